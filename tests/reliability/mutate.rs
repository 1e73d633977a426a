//! Mutations of valid files (flips, inserts, deletions, truncation, copies,
//! tricky numbers written over digits or as u64 fields), as proptest
//! strategies so a failure shrinks to a small list of edits.

use proptest::prelude::*;

/// Tokens that hit size and number handling.
const TOKENS: &[&str] = &[
    "99999999999999999999",
    "18446744073709551615",
    "4294967296",
    "1e308",
    "-1",
    "0",
    "1.5",
    "NaN",
    "null",
    "[",
    "{",
    "\"",
    "]]",
    "\\u0000",
    "é",
];

const U64S: &[u64] = &[
    0,
    1,
    0xff,
    1 << 31,
    1 << 32,
    1 << 40,
    u64::MAX / 2,
    u64::MAX,
];

#[derive(Debug, Clone)]
pub enum Op {
    Set(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
    /// Copies `len` bytes from one place to another.
    Dup(usize, usize, usize),
    /// Overwrites the digit run at or after a position with a token.
    Number(usize, usize),
    /// Inserts a token.
    Token(usize, usize),
    /// Writes a little-endian u64 (binary headers: lengths, offsets).
    U64(usize, usize),
    /// In a JSON text: replaces one value (leaf or container, picked
    /// uniformly) with a tricky one, so every field is reached.
    Json(usize, usize),
}

fn tricky_json(t: usize) -> serde_json::Value {
    use serde_json::json;
    [
        json!(u64::MAX),
        json!(-1),
        json!(1e308),
        json!(0),
        json!(""),
        json!(null),
        json!([]),
        json!({}),
        json!(4294967296u64),
        json!(99999999999u64),
        json!("x|||y"),
        json!([[1, 2], [3]]),
        json!(true),
        json!(-9223372036854775808i64),
    ][t % 14]
        .clone()
}

/// Visits every value of a JSON tree, pre-order.
fn nth_value(v: &mut serde_json::Value, n: &mut usize) -> Option<*mut serde_json::Value> {
    if *n == 0 {
        return Some(v as *mut _);
    }
    *n -= 1;
    match v {
        serde_json::Value::Array(a) => a.iter_mut().find_map(|c| nth_value(c, n)),
        serde_json::Value::Object(o) => o.values_mut().find_map(|c| nth_value(c, n)),
        _ => None,
    }
}

fn count_values(v: &serde_json::Value) -> usize {
    1 + match v {
        serde_json::Value::Array(a) => a.iter().map(count_values).sum(),
        serde_json::Value::Object(o) => o.values().map(count_values).sum(),
        _ => 0,
    }
}

fn op() -> impl Strategy<Value = Op> {
    let p = any::<usize>();
    prop_oneof![
        3 => (p, any::<u8>()).prop_map(|(p, b)| Op::Set(p, b)),
        1 => (p, any::<u8>()).prop_map(|(p, b)| Op::Insert(p, b)),
        1 => p.prop_map(Op::Delete),
        1 => p.prop_map(Op::Truncate),
        1 => (p, p, 0usize..64).prop_map(|(a, b, n)| Op::Dup(a, b, n)),
        3 => (p, 0..TOKENS.len()).prop_map(|(p, t)| Op::Number(p, t)),
        2 => (p, 0..TOKENS.len()).prop_map(|(p, t)| Op::Token(p, t)),
        2 => (p, 0..U64S.len()).prop_map(|(p, t)| Op::U64(p, t)),
        4 => (p, 0usize..14).prop_map(|(p, t)| Op::Json(p, t)),
    ]
}

/// One to five edits.
pub fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 1..6)
}

/// `base` with the edits applied (positions are taken modulo the length).
pub fn apply(base: &[u8], ops: &[Op]) -> Vec<u8> {
    let mut v = base.to_vec();
    for op in ops {
        let at = |p: usize, v: &Vec<u8>| if v.is_empty() { 0 } else { p % v.len() };
        match *op {
            Op::Set(p, b) => {
                if !v.is_empty() {
                    let i = at(p, &v);
                    v[i] = b;
                }
            }
            Op::Insert(p, b) => {
                let i = p % (v.len() + 1);
                v.insert(i, b);
            }
            Op::Delete(p) => {
                if !v.is_empty() {
                    let i = at(p, &v);
                    v.remove(i);
                }
            }
            Op::Truncate(p) => v.truncate(p % (v.len() + 1)),
            Op::Dup(a, b, n) => {
                if !v.is_empty() {
                    let a = at(a, &v);
                    let n = n.min(v.len() - a);
                    let chunk = v[a..a + n].to_vec();
                    let b = b % (v.len() + 1);
                    v.splice(b..b, chunk);
                }
            }
            Op::Number(p, t) => {
                let start = at(p, &v);
                if let Some(d) = v[start..].iter().position(u8::is_ascii_digit) {
                    let s = start + d;
                    let e = s + v[s..].iter().take_while(|b| b.is_ascii_digit()).count();
                    v.splice(s..e, TOKENS[t].bytes());
                }
            }
            Op::Token(p, t) => {
                let i = p % (v.len() + 1);
                v.splice(i..i, TOKENS[t].bytes());
            }
            Op::Json(p, t) => {
                if let Ok(mut tree) = serde_json::from_slice::<serde_json::Value>(&v) {
                    let mut n = p % count_values(&tree);
                    if let Some(at) = nth_value(&mut tree, &mut n) {
                        // SAFETY: `at` points into `tree`, alive and not otherwise borrowed.
                        unsafe { *at = tricky_json(t) };
                    }
                    v = serde_json::to_vec_pretty(&tree).unwrap();
                }
            }
            Op::U64(p, t) => {
                if v.len() >= 8 {
                    // Header fields sit near the start: favour the first 64 bytes.
                    let i = if p % 2 == 0 {
                        (p / 2) % 57.min(v.len() - 7)
                    } else {
                        p % (v.len() - 7)
                    };
                    v[i..i + 8].copy_from_slice(&U64S[t].to_le_bytes());
                }
            }
        }
    }
    v
}
