//! How problems are listed: every semantic problem, type error and unknown
//! key at once, each by its path (an array's element by its place in the
//! file), a long unknown key clipped, and a key set aside for its value not
//! also called missing; and loading never panics, whatever the document.

use super::super::*;

#[test]
fn every_problem_is_listed() {
    let err = Settings::from_toml(
        r#"
        [server]
        listen = "nowhere"
        [[tenants]]
        id = "a"
        [[tenants.buckets]]
        name = "x"
        routes = ["FETCH"]
        permits = 0
        window_ms = 1000
        [[tenants.buckets]]
        name = "x"
        routes = ["GET /a"]
        [[tenants]]
        id = "a"
        "#,
    )
    .unwrap_err();
    let all = err.to_string();
    for needle in [
        "server.listen \"nowhere\"",
        "route \"FETCH\"",
        "permits must be above 0",
        "name \"x\" is used twice",
        "limits nothing",
        "id \"a\" is used twice",
        "has no [[tenants.buckets]]",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    assert_eq!(err.problems.len(), 7, "{all}");
}

#[test]
fn every_type_error_and_unknown_key_is_listed() {
    let err = Settings::from_toml(
        r#"
        [server]
        max_wait_ms = "soon"
        listen_on = "127.0.0.1:1"
        [learning]
        beta = "a lot"
        [[tenants]]
        id = "a"
        colour = "blue"
        [[tenants.buckets]]
        name = "x"
        routes = ["* /**"]
        permits = "sixty"
        window_ms = 60000
        [[tenants.buckets]]
        name = "y"
        routes = ["* /**"]
        max_in_flight = -1
        lease_ttl = 5
        "#,
    )
    .unwrap_err();
    let all = err.to_string();
    for needle in [
        "server.max_wait_ms",
        "server.listen_on",
        "learning.beta",
        "tenants[0].colour",
        "tenants[0].buckets[0].permits",
        "tenants[0].buckets[1].max_in_flight",
        "tenants[0].buckets[1].lease_ttl",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    assert_eq!(err.problems.len(), 7, "{all}");
}

#[test]
fn a_problem_in_an_array_names_the_element_by_its_place_in_the_file() {
    let err = Settings::from_toml(
        "[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\n\
         routes = [\"GET /a\", 5, 6, \"GET /b\", 7]\npermits = 1\nwindow_ms = 1000\n",
    )
    .unwrap_err()
    .to_string();
    for at in [1, 2, 4] {
        assert!(
            err.contains(&format!("tenants[0].buckets[0].routes[{at}]: invalid type")),
            "routes[{at}]: {err}"
        );
    }
    assert!(!err.contains("routes[3]"), "{err}");
    // A missing key of the element after one set aside is still named.
    let err = Settings::from_toml(
        "[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = 5\nroutes = [\"* /**\"]\n\
         max_in_flight = 1\n[[tenants.buckets]]\nroutes = [\"* /**\"]\nmax_in_flight = 1\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("tenants[0].buckets[0].name: invalid type"),
        "{err}"
    );
    assert!(
        err.contains("tenants[0].buckets[1]: missing field `name`"),
        "{err}"
    );
}

#[test]
fn a_key_set_aside_for_its_value_is_not_also_missing() {
    let err = Settings::from_toml(
        "[[auth.tokens]]\nname = \"x\"\nsha256 = \"00\"\nrole = \"admn\"\ntenants = []\n",
    )
    .unwrap_err();
    assert_eq!(
        err.problems,
        ["auth.tokens[0].role: unknown variant `admn`, expected `client` or `admin`"]
    );
    // A key that is really missing still is one.
    let err = Settings::from_toml("[[auth.tokens]]\nname = \"x\"\nsha256 = \"00\"\n").unwrap_err();
    assert!(
        err.problems
            .iter()
            .any(|p| p.contains("missing field `role`")),
        "{err}"
    );
}

#[test]
fn unknown_keys_are_rejected() {
    let err = Settings::from_toml("[server]\nlisten_on = \"127.0.0.1:1\"\n").unwrap_err();
    assert!(err.to_string().contains("listen_on"), "{err}");
}

#[test]
fn a_long_unknown_key_is_clipped_where_it_is_named() {
    let key = "k".repeat(5_000);
    let err = Settings::from_toml(&format!("[server]\n{key} = 1\n")).unwrap_err();
    let all = err.to_string();
    assert!(all.len() < 1_000, "{} bytes: {all}", all.len());
    assert!(all.contains(&format!("server.{}…", &key[..64])), "{all}");
    assert!(all.contains("expected one of `listen`"), "{all}");
    // A value of the wrong type is quoted by serde: clipped too.
    let value = "v".repeat(5_000);
    let err = Settings::from_toml(&format!("[server]\nmax_wait_ms = \"{value}\"\n")).unwrap_err();
    let all = err.to_string();
    assert!(all.len() < 1_000, "{} bytes: {all}", all.len());
    assert!(all.contains("server.max_wait_ms: invalid type"), "{all}");
    // A long key from the environment is still said to come from there.
    let var = format!("QUOTA_BROKER__SERVER__{}", "K".repeat(200));
    let err = Settings::load(None, [(var, "1".to_owned())]).unwrap_err();
    let all = err.to_string();
    assert!(
        all.contains("(set by the environment variable QUOTA_BROKER__SERVER__KKK"),
        "{all}"
    );
    assert!(all.len() < 1_000, "{} bytes: {all}", all.len());
}

proptest::proptest! {
    /// Whatever a config file holds, loading it answers (settings or a
    /// list of problems) and never panics.
    #[test]
    fn loading_any_document_never_panics(doc in "(\\[[a-z.]{1,12}\\]\n|[a-z_]{1,12} = (\"[a-z0-9*/ ]{0,12}\"|-?[0-9]{1,6}|true|\\[\\])\n){0,12}") {
        let _ = Settings::from_toml(&doc);
    }

    /// Nor does an arbitrary string.
    #[test]
    fn loading_any_string_never_panics(doc in proptest::prelude::any::<String>()) {
        let _ = Settings::from_toml(&doc);
    }
}
