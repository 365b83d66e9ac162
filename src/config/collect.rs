//! Reads the layered configuration into its raw form while collecting every
//! structural problem (a key of the wrong type, an unknown key) with its
//! path, instead of stopping at the first as serde does: after each error
//! the offending key is set aside and the document read again, until it
//! reads cleanly or an error names no key that could be set aside.

use super::ConfigError;
use serde::de::DeserializeOwned;
use serde_path_to_error::{Path, Segment};

/// Most structural problems listed before giving up on a document.
const MAX_PROBLEMS: usize = 50;

/// Deserializes `T` from `doc`, or lists every structural problem found.
/// `written`: keys the environment set and their values as written; an
/// environment variable's value reads as a number or a boolean where it
/// looks like one, and as written where a string is expected (a node
/// named `007`, a state directory `2026`).
pub(super) fn read<T: DeserializeOwned>(
    mut doc: toml::Value,
    written: &[(String, String)],
) -> Result<T, ConfigError> {
    let mut problems = Vec::new();
    // Keys set aside so far, where they are in the file: a required one
    // then reads as missing, which is not a problem of its own.
    let mut removed: Vec<Vec<Seg>> = Vec::new();
    // Every key or element set aside, in the document as it was then: an
    // element set aside moves the ones after it down, and a problem names
    // an element by its place in the file.
    let mut set_aside_paths: Vec<Vec<Seg>> = Vec::new();
    loop {
        match serde_path_to_error::deserialize::<_, T>(doc.clone()) {
            Ok(t) if problems.is_empty() => return Ok(t),
            Ok(_) => break,
            Err(e) => {
                let path = e.path().clone();
                // The first line: the parser's own "in `key`" repeats the path.
                let inner = e.into_inner().to_string();
                let what = inner.lines().next().unwrap_or_default().trim();
                let at = match path.to_string().as_str() {
                    "." | "" => String::new(),
                    at => at.to_owned(),
                };
                let as_written = written.iter().find(|(key, _)| *key == at);
                if what.starts_with("invalid type:") && what.ends_with("expected a string") {
                    let segments: Vec<&Segment> = path.iter().collect();
                    if let (Some((_, v)), Some(slot)) = (as_written, walk(&mut doc, &segments)) {
                        if !slot.is_str() {
                            *slot = toml::Value::String(v.clone());
                            continue;
                        }
                    }
                }
                let what = &out_of_range(what, as_written.map(|(_, v)| v.as_str()))
                    .unwrap_or_else(|| clip_words(what));
                let segs: Vec<Seg> = path.iter().map(Seg::of).collect();
                // Compared where they are in the file: an element set
                // aside moved the ones after it.
                let in_the_file = as_in_the_file(&segs, &set_aside_paths);
                let set_aside = what
                    .strip_prefix("missing field `")
                    .and_then(|rest| rest.strip_suffix('`'))
                    .is_some_and(|field| {
                        let mut key = in_the_file.clone();
                        key.push(Seg::Key(field.to_owned()));
                        removed.contains(&key)
                    });
                if !set_aside {
                    problems.push(if at.is_empty() {
                        what.to_owned()
                    } else {
                        format!("{}: {what}", clip_path(&in_the_file))
                    });
                }
                set_aside_paths.push(segs);
                removed.push(in_the_file);
                if !remove(&mut doc, &path) || problems.len() >= MAX_PROBLEMS {
                    break;
                }
            }
        }
    }
    Err(ConfigError { problems })
}

/// serde's words for a whole number the key's type cannot hold, said as
/// such: `invalid value: integer `5000000000`, expected u32` from a file,
/// or, from the environment (`written`: the variable's value), `invalid
/// type: floating point `1e20`, expected u64` (a number past i64 is read as
/// a float there), which blamed the type of a number that has the right
/// one. `None` for any other message.
fn out_of_range(what: &str, written: Option<&str>) -> Option<String> {
    let ty = what.rsplit_once(", expected ")?.1;
    let (min, max): (i128, i128) = match ty {
        "u8" => (0, u8::MAX.into()),
        "u16" => (0, u16::MAX.into()),
        "u32" => (0, u32::MAX.into()),
        // Neither TOML nor an environment variable holds a number past i64.
        "u64" | "usize" => (0, i64::MAX.into()),
        "i8" => (i8::MIN.into(), i8::MAX.into()),
        "i16" => (i16::MIN.into(), i16::MAX.into()),
        "i32" => (i32::MIN.into(), i32::MAX.into()),
        "i64" | "isize" => (i64::MIN.into(), i64::MAX.into()),
        _ => return None,
    };
    let value = if let Some(rest) = what.strip_prefix("invalid value: integer `") {
        rest.split_once('`')?.0.to_owned()
    } else if what.starts_with("invalid type: floating point `") {
        let written = written?.trim();
        let digits = written.strip_prefix(['-', '+']).unwrap_or(written);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        clip_key(written)
    } else {
        return None;
    };
    Some(format!(
        "{value} is out of range for this key (it takes whole numbers from {min} to {max})"
    ))
}

/// Longest key shown in a problem: a key is input, and a 5,000-character
/// one must not make a 5,000-character line.
const KEY_CHARS: usize = 64;

/// `key` as a problem shows it: as is, or cut after [`KEY_CHARS`].
fn clip_key(key: &str) -> String {
    crate::error::cut(key, KEY_CHARS)
}

/// One step of a path into the document.
#[derive(Debug, Clone, PartialEq)]
enum Seg {
    /// A key of a table (or an enum's variant).
    Key(String),
    /// An element of an array.
    At(usize),
    Unknown,
}

impl Seg {
    fn of(s: &Segment) -> Seg {
        match s {
            Segment::Map { key } => Seg::Key(key.clone()),
            Segment::Enum { variant } => Seg::Key(variant.clone()),
            Segment::Seq { index } => Seg::At(*index),
            Segment::Unknown => Seg::Unknown,
        }
    }
}

/// `path`, read after every removal in `set_aside` (oldest first), as it
/// is in the file: each array element removed before an element moved it
/// down by one.
fn as_in_the_file(path: &[Seg], set_aside: &[Vec<Seg>]) -> Vec<Seg> {
    let mut path = path.to_vec();
    for gone in set_aside.iter().rev() {
        let Some((Seg::At(gone_at), parent)) = gone.split_last() else {
            continue;
        };
        let depth = parent.len();
        if path.len() > depth && path[..depth] == *parent {
            if let Seg::At(at) = &mut path[depth] {
                if *at >= *gone_at {
                    *at += 1;
                }
            }
        }
    }
    path
}

/// The path as serde_path_to_error writes it (`tenants[0].buckets`),
/// each key clipped.
fn clip_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for s in path {
        match s {
            Seg::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&clip_key(key));
            }
            Seg::At(index) => out.push_str(&format!("[{index}]")),
            Seg::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    out
}

/// Longest message of serde's shown.
const MESSAGE_CHARS: usize = 1_000;

/// serde's message with every word in it clipped, then the whole: it
/// quotes what was read (an unknown field's name, a value of the wrong
/// type), however long.
fn clip_words(message: &str) -> String {
    let words: Vec<String> = message.split(' ').map(clip_key).collect();
    crate::error::cut(&words.join(" "), MESSAGE_CHARS)
}

/// A dotted key (`server.listen`) as problems show it, each part clipped.
pub(super) fn clip_dotted(key: &str) -> String {
    key.split('.').map(clip_key).collect::<Vec<_>>().join(".")
}

/// Removes the value at `path` from `doc`; false if there is nothing
/// there to remove.
fn remove(doc: &mut toml::Value, path: &Path) -> bool {
    let segments: Vec<&Segment> = path.iter().collect();
    match segments.split_last() {
        Some((Segment::Map { key }, parent)) => match walk(doc, parent) {
            Some(toml::Value::Table(t)) => t.remove(key).is_some(),
            _ => false,
        },
        Some((Segment::Seq { index }, parent)) => match walk(doc, parent) {
            Some(toml::Value::Array(items)) if *index < items.len() => {
                items.remove(*index);
                true
            }
            _ => false,
        },
        _ => false,
    }
}

fn walk<'a>(doc: &'a mut toml::Value, segments: &[&Segment]) -> Option<&'a mut toml::Value> {
    let mut at = doc;
    for s in segments {
        at = match (s, at) {
            (Segment::Map { key }, toml::Value::Table(t)) => t.get_mut(key)?,
            (Segment::Seq { index }, toml::Value::Array(a)) => a.get_mut(*index)?,
            _ => return None,
        };
    }
    Some(at)
}
