//! Names and routes: a tenant, bucket, class or token name with control
//! characters, slashes or invisible format characters, or longer than a
//! request may carry; two tenants whose lease-id tags collide; and a route
//! no request path can match, saying what to write.

use super::super::*;

#[test]
fn names_with_control_characters_or_slashes_are_refused() {
    let err = Settings::from_toml(
        "[[classes]]\nname = \"a/b\"\norder = 0\n[[classes]]\nname = \"batch\"\norder = 1\n\
         [[tenants]]\nid = \"t/1\"\n[[tenants.buckets]]\nname = \"b\"\nroutes = [\"* /**\"]\n\
         max_in_flight = 1\n[[tenants]]\nid = \"t\\nforged log line\"\n[[tenants.buckets]]\n\
         name = \"b\\tc\"\nroutes = [\"* /**\"]\nmax_in_flight = 1\n",
    )
    .unwrap_err()
    .to_string();
    for what in [
        "tenants[0]: id must not hold '/'",
        "tenants[1]: id must not hold control characters",
        "name must not hold control characters",
        "classes[0] (\"a/b\"): name must not hold '/'",
    ] {
        assert!(err.contains(what), "{what}: {err}");
    }
    assert!(!err.contains("forged log line\n"), "{err}");
    // Quotes, spaces and other scripts are names like any other.
    assert!(Settings::from_toml(
        "[[tenants]]\nid = \"Acme \\\"EU\\\" 👍\"\n[[tenants.buckets]]\nname = \"b q\"\n\
         routes = [\"* /**\"]\nmax_in_flight = 1\n"
    )
    .is_ok());
}

/// Every name a config gives (tenant, bucket, class, token) is held
/// to one rule: nothing that prints as something else.
#[test]
fn names_with_invisible_format_characters_are_refused_like_control_characters() {
    let token = |name: &str| {
        format!(
            "[[auth.tokens]]\nname = \"{name}\"\nsha256 = \"{}\"\nrole = \"admin\"\n\
             tenants = [\"*\"]\n",
            crate::auth::hash_token("a-token")
        )
    };
    let err = Settings::from_toml(&format!(
        "[[classes]]\nname = \"batch\\u2066\"\norder = 0\n[[classes]]\nname = \"batch\"\n\
         order = 1\n[[tenants]]\nid = \"acme\\u202Eevil\"\n[[tenants.buckets]]\n\
         name = \"b\\u200Bq\"\nroutes = [\"* /**\"]\nmax_in_flight = 1\n{}{}",
        token("ops\\nforged"),
        token("ops\\u202Eevil")
    ))
    .unwrap_err();
    let all = err.to_string();
    for what in [
        "classes[0] (\"batch\\u{2066}\"): name must not hold control characters or \
         invisible format characters: it holds an invisible format character (U+2066",
        "tenants[0]: id must not hold control characters or invisible format characters: \
         it holds an invisible format character (U+202E",
        ".buckets[0] (\"b\\u{200b}q\"): name must not hold control characters or \
         invisible format characters: it holds an invisible format character (U+200B",
        "auth.tokens[0] (\"ops\\nforged\"): name must not hold control characters or \
         invisible format characters: it holds a control character (U+000A",
        "auth.tokens[1] (\"ops\\u{202e}evil\"): name must not hold control characters or \
         invisible format characters: it holds an invisible format character (U+202E",
    ] {
        assert!(all.contains(what), "{what}: {all}");
    }
    assert_eq!(err.problems.len(), 5, "{all}");
    assert!(!all.contains(['\u{202E}', '\u{2066}', '\u{200B}']), "{all}");
}

#[test]
fn names_longer_than_a_request_may_carry_are_refused() {
    let config = |tenant: &str, bucket: &str| {
        Settings::from_toml(&format!(
            "[[tenants]]\nid = \"{tenant}\"\n[[tenants.buckets]]\nname = \"{bucket}\"\n\
             routes = [\"* /**\"]\nmax_in_flight = 1\n"
        ))
    };
    let long = "é".repeat(150);
    let err = config(&long, &"b".repeat(MAX_ID_LEN + 1))
        .unwrap_err()
        .to_string();
    for what in [
        "tenants[0]: id is 300 bytes long, more than a request may carry (256), so no \
         request could name it: shorten it",
        ".buckets[0] (\"bbbbbbbb",
        "name is 257 bytes long, more than a request may carry (256)",
    ] {
        assert!(err.contains(what), "{what}: {err}");
    }
    assert!(err.len() < 1_000, "{} bytes: {err}", err.len());
    // The longest a request may carry is a name like any other.
    let s = config(&"t".repeat(MAX_ID_LEN), &"b".repeat(MAX_ID_LEN)).unwrap();
    assert_eq!(s.tenants[0].buckets[0].name.len(), MAX_ID_LEN);
}

#[test]
fn two_tenants_whose_lease_id_tags_collide_are_refused() {
    let mut seen: std::collections::HashMap<u32, String> = std::collections::HashMap::new();
    let (a, b) = (0u64..)
        .find_map(|n| {
            let id = format!("org-{n}");
            let tag = crate::limits::tenant_tag(&id);
            seen.insert(tag, id.clone()).map(|other| (other, id))
        })
        .unwrap();
    let tenant = |id: &str| {
        format!(
            "[[tenants]]\nid = \"{id}\"\n[[tenants.buckets]]\nname = \"b\"\n\
             routes = [\"* /**\"]\nmax_in_flight = 1\n"
        )
    };
    let err = Settings::from_toml(&(tenant(&a) + &tenant(&b)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("has the same lease-id tag as"), "{err}");
}

#[test]
fn a_route_no_request_path_can_match_is_refused_saying_what_to_write() {
    let err = Settings::from_toml(
        "[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\n\
         routes = [\"GET /t/\", \"GET /a/../b\", \"GET /p%20q\", \"GET /z?q=1\", \
         \"GET /c[é]\"]\nmax_in_flight = 1\n",
    )
    .unwrap_err();
    assert_eq!(
        err.problems,
        [
            "tenants[0] (\"t\").buckets[0] (\"b\"): route \"GET /t/\": a trailing \"/\" \
             never matches: request paths are matched without it; write \"GET /t\"",
            "tenants[0] (\"t\").buckets[0] (\"b\"): route \"GET /a/../b\": a \".\" or \"..\" \
             segment never matches: request paths are matched with dot segments resolved; \
             write \"GET /b\"",
            "tenants[0] (\"t\").buckets[0] (\"b\"): route \"GET /p%20q\": a percent-escape \
             never matches: request paths are matched decoded, where only a \"%\" itself \
             is still spelled \"%25\" (\"?\" matches a space, which a pattern cannot \
             hold); write \"GET /p?q\"",
            "tenants[0] (\"t\").buckets[0] (\"b\"): route \"GET /z?q=1\": a query string \
             never matches: request paths are matched without theirs (in a pattern, \"?\" \
             matches any one character); write \"GET /z\"",
            "tenants[0] (\"t\").buckets[0] (\"b\"): route \"GET /c[é]\": path \"/c[é]\": a \
             \"[…]\" set matches one byte, so a non-ASCII character in it matches nothing; \
             give the choices as alternatives (\"{é,è}\")",
        ]
    );
    // What they are told to write is accepted.
    assert!(Settings::from_toml(
        "[[tenants]]\nid = \"t\"\n[[tenants.buckets]]\nname = \"b\"\n\
         routes = [\"GET /t\", \"GET /b\", \"GET /p?q\", \"GET /z\", \"GET /c{é,è}\"]\n\
         max_in_flight = 1\n"
    )
    .is_ok());
}
