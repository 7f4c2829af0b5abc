//! Runs the Aerospike test double: `aerospike-double [ADDR] [NAMESPACE...]`
//! (default `127.0.0.1:3000 hevlayer test`). Prints `listening on HOST:PORT` and runs until
//! SIGINT/SIGTERM.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let bind = args.next().unwrap_or_else(|| "127.0.0.1:3000".to_owned());
    let mut namespaces: Vec<String> = args.collect();
    if namespaces.is_empty() {
        namespaces = vec!["hevlayer".to_owned(), "test".to_owned()];
    }
    let refs: Vec<&str> = namespaces.iter().map(String::as_str).collect();
    let double = match aerospike_double::Double::start(&bind, &refs).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("aerospike-double: cannot listen on {bind}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("listening on {}", double.hosts());
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    ExitCode::SUCCESS
}
