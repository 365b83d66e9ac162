//! The config file's own errors: a TOML syntax error names the file and
//! where (a long line not echoed back), and a missing file is a clear
//! error.

use super::super::*;
use std::path::Path;

#[test]
fn a_toml_syntax_error_names_the_file() {
    let path = std::env::temp_dir().join(format!("qb-syntax-{}.toml", std::process::id()));
    std::fs::write(&path, "[server\nlisten = 1\n").unwrap();
    let err = Settings::load(Some(&path), []).unwrap_err().to_string();
    assert!(
        err.contains(&format!("config file {}: TOML parse error", path.display())),
        "{err}"
    );
    // A long line is not echoed back, and the error stays on one line.
    let long = format!("[server]\nlisten = \"{}\n", "a".repeat(100_000));
    std::fs::write(&path, long).unwrap();
    let err = Settings::load(Some(&path), []).unwrap_err().to_string();
    let _ = std::fs::remove_file(&path);
    assert!(err.len() < 1_000, "{} bytes", err.len());
    assert!(
        err.contains("line 2") && err.contains("invalid basic string"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 2, "{err}");
    // A number TOML cannot hold says where it is too.
    std::fs::write(&path, "[server]\nmax_wait_ms = 18446744073709551615\n").unwrap();
    let err = Settings::load(Some(&path), []).unwrap_err().to_string();
    let _ = std::fs::remove_file(&path);
    assert!(
        err.contains(&format!(
            "config file {}: TOML parse error at line 2, column 15",
            path.display()
        )),
        "{err}"
    );
}

#[test]
fn missing_file_is_a_clear_error() {
    let err = Settings::load(Some(Path::new("/nonexistent/broker.toml")), []).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/broker.toml"),
        "{err}"
    );
}
