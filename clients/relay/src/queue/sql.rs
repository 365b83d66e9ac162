//! The statements that keep an order key's records in order by their due
//! times, for the writer and for dead letters: a record behind a dead
//! letter is held (due at [`HELD_MS`]), the records behind a retried one
//! are put off with it, and held records are released once their dead
//! letter is settled. And the placeholders of each back end.

use super::Db;

/// `text` with `?` placeholders, or `$1, $2, ...` for PostgreSQL.
pub(super) fn placeholders(db: &Db, text: &str) -> String {
    match db {
        Db::Sqlite(_) => text.to_owned(),
        Db::Postgres(_) => {
            let mut out = String::with_capacity(text.len() + 8);
            let mut n = 0;
            for c in text.chars() {
                if c == '?' {
                    n += 1;
                    out.push('$');
                    out.push_str(&n.to_string());
                } else {
                    out.push(c);
                }
            }
            out
        }
    }
}

/// The due time of a record held behind a dead letter of its order key:
/// never, until the dead letter is replayed or dropped. A record cannot go
/// before an older one of its key, so its due time is kept at least that
/// one's (a dead letter's being this): the claim, which reads due records
/// in due order, then never reads past records that cannot go, however
/// many there are. Only a speed-up: the claim still checks the order.
pub(super) const HELD_MS: i64 = i64::MAX;

/// Holds (due at `?`, [`HELD_MS`]) the pending records behind record `?`
/// (its id, twice) of its key.
pub(super) const HOLD_BEHIND: &str = "UPDATE relay_records SET not_before_ms = ? \
     WHERE order_key = (SELECT order_key FROM relay_records WHERE id = ?) \
       AND state = 'pending' AND id > ?";

/// Puts the pending records behind record `?` (its id, twice) of its key
/// off until at least `?` (twice), the time it was put off to.
pub(super) const DELAY_BEHIND: &str = "UPDATE relay_records SET not_before_ms = ? \
     WHERE order_key = (SELECT order_key FROM relay_records WHERE id = ?) \
       AND state = 'pending' AND id > ? AND not_before_ms < ?";

/// Makes due at `?` the held records (due at `?`, [`HELD_MS`]) whose key
/// has no dead letter left.
pub(super) const RELEASE_HELD: &str = "UPDATE relay_records SET not_before_ms = ? \
     WHERE state = 'pending' AND not_before_ms = ? \
       AND NOT EXISTS (SELECT 1 FROM relay_records d \
         WHERE d.order_key = relay_records.order_key AND d.state = 'dead')";

/// Whether a held record (due at `?`, [`HELD_MS`]) has no dead letter
/// ahead of it: read before [`RELEASE_HELD`], so a queue with nothing to
/// release is not written.
pub(super) const STRANDED: &str = "SELECT r.id FROM relay_records r \
     WHERE r.state = 'pending' AND r.not_before_ms = ? \
       AND NOT EXISTS (SELECT 1 FROM relay_records d \
         WHERE d.order_key = r.order_key AND d.state = 'dead') LIMIT 1";

/// Makes due at `?` the held records (due at `?`, [`HELD_MS`]) of key `?`,
/// unless key `?` (the same) still has a dead letter.
pub(super) const RELEASE_KEY: &str = "UPDATE relay_records SET not_before_ms = ? \
     WHERE order_key = ? AND state = 'pending' AND not_before_ms = ? \
       AND NOT EXISTS (SELECT 1 FROM relay_records d WHERE d.order_key = ? AND d.state = 'dead')";

/// A dead letter of key `?`, if it has one (a SQLite intake's look: see
/// `HoldDeadLetters`).
pub(super) const DEAD_OF_KEY: &str =
    "SELECT id FROM relay_records WHERE order_key = ? AND state = 'dead' ORDER BY id LIMIT 1";

/// The due time of key `?`'s newest pending record.
pub(super) const LAST_DUE: &str = "SELECT not_before_ms FROM relay_records \
     WHERE order_key = ? AND state = 'pending' ORDER BY id DESC LIMIT 1";
