"""Runs last (file order): Ctrl-C stops the store and every gateway process `make demo` started."""

from conftest import port_open, stop_with_ctrl_c


def test_ctrl_c_stops_everything(demo):
    assert all(port_open(port) for port in demo["ports"].values()), "everything was listening"
    stop_with_ctrl_c(demo["proc"])
    assert demo["proc"].returncode in (130, 0), demo["proc"].returncode
    still = [name for name, port in demo["ports"].items() if port_open(port)]
    assert not still, f"still listening after Ctrl-C: {still}"
