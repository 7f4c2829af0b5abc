//! Map CDT operations (`operations::maps` in the client) on a bin holding a map: put, put-items,
//! increment, remove by key / key list / value / key range, size, get by key / key range. Both
//! modify and read ops; a failing op (say a create-only put on an existing key) fails the whole
//! command, which the caller applies atomically. Map contexts (nested maps) and inverted
//! selections are refused with `PARAMETER_ERROR`.

use crate::msgpack::{cmp, decode_all, MapVal, Val};
use crate::result_code;

const SET_TYPE: i64 = 64;
const PUT: i64 = 67;
const PUT_ITEMS: i64 = 68;
const INCREMENT: i64 = 73;
const DECREMENT: i64 = 74;
const REMOVE_BY_KEY: i64 = 76;
const REMOVE_KEY_LIST: i64 = 81;
const REMOVE_BY_VALUE: i64 = 82;
const REMOVE_BY_KEY_INTERVAL: i64 = 84;
const SIZE: i64 = 96;
const GET_BY_KEY: i64 = 97;
const GET_BY_KEY_INTERVAL: i64 = 103;
/// The first element of an op carrying a context (nested CDT): not supported.
const CONTEXT_EVAL: i64 = 0xff;

// Write flags.
const CREATE_ONLY: i64 = 1;
const UPDATE_ONLY: i64 = 2;
const NO_FAIL: i64 = 4;
const PARTIAL: i64 = 8;

// Return types.
const RT_NONE: i64 = 0;
const RT_COUNT: i64 = 5;
const RT_KEY: i64 = 6;
const RT_VALUE: i64 = 7;
const RT_KEY_VALUE: i64 = 8;
const RT_EXISTS: i64 = 13;

/// The outcome of one map op: the map to store (None: unchanged) and the op's result.
pub struct Applied {
    pub map: Option<MapVal>,
    pub result: Val,
}

fn int(v: Option<&Val>) -> Result<i64, u8> {
    match v {
        Some(Val::Int(i)) => Ok(*i),
        _ => Err(result_code::PARAMETER_ERROR),
    }
}

/// Applies the msgpack-encoded op `op` to `current` (the bin's map, if the bin exists).
pub fn apply(current: Option<&MapVal>, op: &[u8]) -> Result<Applied, u8> {
    let Some(Val::List(args)) = decode_all(op) else {
        return Err(result_code::PARAMETER_ERROR);
    };
    let code = int(args.first())?;
    if code == CONTEXT_EVAL {
        return Err(result_code::PARAMETER_ERROR);
    }
    let args = &args[1..];
    let mut map = current.cloned().unwrap_or_default();
    let changed = |map: MapVal, result: Val| {
        Ok(Applied {
            map: Some(map),
            result,
        })
    };
    match code {
        SET_TYPE => {
            map.flags = u8::try_from(int(args.first())?).map_err(|_| result_code::PARAMETER_ERROR)?;
            changed(map, Val::Nil)
        }
        PUT => {
            let key = args.first().ok_or(result_code::PARAMETER_ERROR)?.clone();
            let value = args.get(1).ok_or(result_code::PARAMETER_ERROR)?.clone();
            set_order(&mut map, current, args.get(2));
            let flags = args.get(3).map_or(Ok(0), |f| int(Some(f)))?;
            match allowed(&map, &key, flags) {
                Ok(true) => map.insert(key, value),
                Ok(false) => return unchanged_size(current),
                Err(code) => return Err(code),
            }
            let size = Val::Int(map.entries.len() as i64);
            changed(map, size)
        }
        PUT_ITEMS => {
            let Some(Val::Map(items)) = args.first() else {
                return Err(result_code::PARAMETER_ERROR);
            };
            set_order(&mut map, current, args.get(1));
            let flags = args.get(2).map_or(Ok(0), |f| int(Some(f)))?;
            let mut accepted = Vec::new();
            for (k, v) in &items.entries {
                match allowed(&map, k, flags) {
                    Ok(true) => accepted.push((k.clone(), v.clone())),
                    Ok(false) if flags & PARTIAL == 0 => return unchanged_size(current),
                    Ok(false) => {}
                    Err(code) => return Err(code),
                }
            }
            for (k, v) in accepted {
                map.insert(k, v);
            }
            let size = Val::Int(map.entries.len() as i64);
            changed(map, size)
        }
        INCREMENT | DECREMENT => {
            let key = args.first().ok_or(result_code::PARAMETER_ERROR)?.clone();
            let by = match args.get(1) {
                Some(Val::Int(i)) => *i,
                _ => 1,
            };
            set_order(&mut map, current, args.get(2));
            let now = match map.get(&key) {
                None => 0,
                Some(Val::Int(i)) => *i,
                Some(_) => return Err(result_code::BIN_TYPE_ERROR),
            };
            let next = if code == INCREMENT {
                now.wrapping_add(by)
            } else {
                now.wrapping_sub(by)
            };
            map.insert(key, Val::Int(next));
            changed(map, Val::Int(next))
        }
        REMOVE_BY_KEY | GET_BY_KEY => {
            let rt = return_type(args.first())?;
            let key = args.get(1).ok_or(result_code::PARAMETER_ERROR)?;
            let selected: Vec<(Val, Val)> = map.remove(key).into_iter().collect();
            let result = single(rt, &selected)?;
            finish(code == REMOVE_BY_KEY && !selected.is_empty(), map, result)
        }
        REMOVE_KEY_LIST => {
            let rt = return_type(args.first())?;
            let Some(Val::List(keys)) = args.get(1) else {
                return Err(result_code::PARAMETER_ERROR);
            };
            let selected: Vec<(Val, Val)> = keys.iter().filter_map(|k| map.remove(k)).collect();
            let result = many(rt, &selected, map.flags)?;
            finish(!selected.is_empty(), map, result)
        }
        REMOVE_BY_VALUE => {
            let rt = return_type(args.first())?;
            let value = args.get(1).ok_or(result_code::PARAMETER_ERROR)?;
            let (selected, kept): (Vec<_>, Vec<_>) = map.entries.drain(..).partition(|(_, v)| v == value);
            map.entries = kept;
            let result = many(rt, &selected, map.flags)?;
            finish(!selected.is_empty(), map, result)
        }
        REMOVE_BY_KEY_INTERVAL | GET_BY_KEY_INTERVAL => {
            let rt = return_type(args.first())?;
            let begin = args.get(1).cloned().unwrap_or(Val::Nil);
            let end = args.get(2).cloned();
            let in_range = |k: &Val| {
                let after_begin = matches!(begin, Val::Nil) || cmp(k, &begin).is_ge();
                let before_end = end.as_ref().is_none_or(|e| cmp(k, e).is_lt());
                after_begin && before_end
            };
            let (selected, kept): (Vec<_>, Vec<_>) = map.entries.drain(..).partition(|(k, _)| in_range(k));
            let result = many(rt, &selected, map.flags)?;
            if code == GET_BY_KEY_INTERVAL {
                return Ok(Applied { map: None, result });
            }
            map.entries = kept;
            finish(!selected.is_empty(), map, result)
        }
        SIZE => Ok(Applied {
            map: None,
            result: Val::Int(map.entries.len() as i64),
        }),
        _ => Err(result_code::PARAMETER_ERROR),
    }
}

/// Whether `key` may be written under `flags`; `Ok(false)` when it is denied without error.
fn allowed(map: &MapVal, key: &Val, flags: i64) -> Result<bool, u8> {
    let exists = map.contains(key);
    let denied = (flags & CREATE_ONLY != 0 && exists) || (flags & UPDATE_ONLY != 0 && !exists);
    if !denied {
        return Ok(true);
    }
    if flags & NO_FAIL != 0 {
        return Ok(false);
    }
    Err(if exists {
        result_code::ELEMENT_EXISTS
    } else {
        result_code::ELEMENT_NOT_FOUND
    })
}

fn unchanged_size(current: Option<&MapVal>) -> Result<Applied, u8> {
    Ok(Applied {
        map: None,
        result: Val::Int(current.map_or(0, |m| m.entries.len()) as i64),
    })
}

/// A new map takes the order attribute the op carries.
fn set_order(map: &mut MapVal, current: Option<&MapVal>, attr: Option<&Val>) {
    if current.is_none() {
        if let Some(Val::Int(a)) = attr {
            map.flags = (*a & 0xff) as u8;
        }
    }
}

fn finish(modified: bool, map: MapVal, result: Val) -> Result<Applied, u8> {
    Ok(Applied {
        map: modified.then_some(map),
        result,
    })
}

fn return_type(v: Option<&Val>) -> Result<i64, u8> {
    let rt = int(v)?;
    // Inverted selections (bit 0x10000) are not supported.
    if rt & !0xff != 0 {
        return Err(result_code::PARAMETER_ERROR);
    }
    Ok(rt)
}

/// The result of a single-key selector.
fn single(rt: i64, selected: &[(Val, Val)]) -> Result<Val, u8> {
    let first = selected.first();
    Ok(match rt {
        RT_NONE => Val::Nil,
        RT_COUNT => Val::Int(selected.len() as i64),
        RT_EXISTS => Val::Bool(first.is_some()),
        RT_KEY => first.map_or(Val::Nil, |(k, _)| k.clone()),
        RT_VALUE => first.map_or(Val::Nil, |(_, v)| v.clone()),
        RT_KEY_VALUE => Val::Map(MapVal {
            flags: 0,
            entries: selected.to_vec(),
        }),
        _ => return Err(result_code::PARAMETER_ERROR),
    })
}

/// The result of a multi-item selector.
fn many(rt: i64, selected: &[(Val, Val)], flags: u8) -> Result<Val, u8> {
    Ok(match rt {
        RT_NONE => Val::Nil,
        RT_COUNT => Val::Int(selected.len() as i64),
        RT_EXISTS => Val::Bool(!selected.is_empty()),
        RT_KEY => Val::List(selected.iter().map(|(k, _)| k.clone()).collect()),
        RT_VALUE => Val::List(selected.iter().map(|(_, v)| v.clone()).collect()),
        RT_KEY_VALUE => Val::Map(MapVal {
            flags,
            entries: selected.to_vec(),
        }),
        _ => return Err(result_code::PARAMETER_ERROR),
    })
}
