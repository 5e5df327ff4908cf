//! Outbox rows: what an application inserted, as decoded from the WAL or read back by SQL.

use std::sync::Arc;

use crate::lsn::Lsn;
use crate::source::pgoutput::{Column, Relation, Tuple};

/// One committed `walpush.outbox` row.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    /// `outbox.id`
    pub id: i64,
    /// The event name.
    pub topic: String,
    /// Whose devices receive it.
    pub recipient: String,
    /// The payload as JSON text (jsonb's canonical output).
    pub payload: Arc<str>,
    /// Channel names the row is restricted to; `None` means all.
    pub channels: Option<Vec<String>>,
    /// Rows with the same recipient and key collapse to the newest within a batch.
    pub collapse_key: Option<String>,
    /// `created_at` in RFC 3339, UTC.
    pub created_at: String,
    /// The LSN of the commit that carried the row.
    pub commit_lsn: Lsn,
}

impl OutboxRow {
    /// Whether the payload is a JSON object (jsonb prints objects starting with `{`).
    pub fn payload_is_object(&self) -> bool {
        self.payload.trim_start().starts_with('{')
    }

    /// Whether the row asks for the channel called `name`.
    pub fn wants(&self, name: &str) -> bool {
        self.channels
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == name))
    }
}

/// Why an Insert could not be read as an outbox row.
#[derive(Debug, thiserror::Error)]
pub enum RowError {
    /// The relation lacks a column walpush needs.
    #[error("relation {relation} has no column {column}")]
    MissingColumn {
        /// `schema.table`
        relation: String,
        /// The column name.
        column: &'static str,
    },
    /// A column value that does not parse.
    #[error("column {column} has an unreadable value")]
    BadValue {
        /// The column name.
        column: &'static str,
    },
}

/// Where each needed column sits in the outbox relation's tuples.
#[derive(Debug, Clone)]
pub struct OutboxLayout {
    id: usize,
    topic: usize,
    recipient: usize,
    payload: usize,
    channels: Option<usize>,
    collapse_key: Option<usize>,
    created_at: Option<usize>,
}

impl OutboxLayout {
    /// Maps a Relation message's columns; fails when a required one is missing.
    pub fn from_relation(rel: &Relation) -> Result<OutboxLayout, RowError> {
        let find = |name: &str| rel.columns.iter().position(|c| c.name == name);
        let need = |column: &'static str| {
            find(column).ok_or_else(|| RowError::MissingColumn {
                relation: format!("{}.{}", rel.namespace, rel.name),
                column,
            })
        };
        Ok(OutboxLayout {
            id: need("id")?,
            topic: need("topic")?,
            recipient: need("recipient")?,
            payload: need("payload")?,
            channels: find("channels"),
            collapse_key: find("collapse_key"),
            created_at: find("created_at"),
        })
    }

    /// Reads one inserted tuple (text format).
    pub fn row(&self, tuple: &Tuple<'_>, commit_lsn: Lsn) -> Result<OutboxRow, RowError> {
        let id = text(tuple, self.id, "id")?
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or(RowError::BadValue { column: "id" })?;
        let required = |index: usize, column: &'static str| {
            text(tuple, index, column)?.ok_or(RowError::BadValue { column })
        };
        let topic = required(self.topic, "topic")?.to_owned();
        let recipient = required(self.recipient, "recipient")?.to_owned();
        let payload: Arc<str> = Arc::from(required(self.payload, "payload")?);
        let channels = match self.channels {
            Some(index) => match text(tuple, index, "channels")? {
                Some(literal) => Some(
                    parse_text_array(literal).ok_or(RowError::BadValue { column: "channels" })?,
                ),
                None => None,
            },
            None => None,
        };
        let collapse_key = match self.collapse_key {
            Some(index) => text(tuple, index, "collapse_key")?.map(str::to_owned),
            None => None,
        };
        let created_at = match self.created_at {
            Some(index) => text(tuple, index, "created_at")?
                .map(rfc3339_from_pg)
                .unwrap_or_default(),
            None => String::new(),
        };
        Ok(OutboxRow {
            id,
            topic,
            recipient,
            payload,
            channels,
            collapse_key,
            created_at,
            commit_lsn,
        })
    }
}

fn text<'a>(
    tuple: &Tuple<'a>,
    index: usize,
    column: &'static str,
) -> Result<Option<&'a str>, RowError> {
    match tuple.get(index) {
        Some(Column::Text(bytes)) => std::str::from_utf8(bytes)
            .map(Some)
            .map_err(|_| RowError::BadValue { column }),
        Some(Column::Null) => Ok(None),
        // An INSERT never carries unchanged TOAST values, and walpush asks for text format.
        _ => Err(RowError::BadValue { column }),
    }
}

/// Converts PostgreSQL's timestamptz output (`2026-12-03 18:40:00.123456+00`) to RFC 3339 UTC.
/// Values chrono cannot read (infinity, BC dates) are passed through unchanged.
pub fn rfc3339_from_pg(value: &str) -> String {
    match chrono::DateTime::parse_from_str(value, "%Y-%m-%d %H:%M:%S%.f%#z") {
        Ok(time) => time
            .with_timezone(&chrono::Utc)
            .format("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string(),
        Err(_) => value.to_owned(),
    }
}

/// Parses a one-dimensional text[] literal (`{a,"b c",NULL}`); NULL elements are dropped.
pub fn parse_text_array(literal: &str) -> Option<Vec<String>> {
    let inner = literal.strip_prefix('{')?.strip_suffix('}')?;
    let mut out = Vec::new();
    if inner.is_empty() {
        return Some(out);
    }
    let mut chars = inner.chars().peekable();
    loop {
        let mut item = String::new();
        let quoted = chars.peek() == Some(&'"');
        if quoted {
            chars.next();
            loop {
                match chars.next()? {
                    '\\' => item.push(chars.next()?),
                    '"' => break,
                    c => item.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                if c == '{' || c == '"' {
                    return None;
                }
                item.push(c);
                chars.next();
            }
        }
        if quoted || item != "NULL" {
            out.push(item);
        }
        match chars.next() {
            None => return Some(out),
            Some(',') => continue,
            Some(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_arrays_parse_like_postgres_prints_them() {
        assert_eq!(parse_text_array("{}"), Some(vec![]));
        assert_eq!(
            parse_text_array("{ios,android}"),
            Some(vec!["ios".to_owned(), "android".to_owned()])
        );
        assert_eq!(
            parse_text_array(r#"{"a b","q\"x",NULL,"NULL"}"#),
            Some(vec!["a b".to_owned(), "q\"x".to_owned(), "NULL".to_owned()])
        );
        assert_eq!(parse_text_array("{{a}}"), None);
        assert_eq!(parse_text_array("{\"open"), None);
        assert_eq!(parse_text_array("a,b"), None);
    }

    #[test]
    fn timestamps_become_rfc3339_utc() {
        assert_eq!(
            rfc3339_from_pg("2026-12-03 18:40:00.123456+00"),
            "2026-12-03T18:40:00.123456Z"
        );
        assert_eq!(
            rfc3339_from_pg("2026-12-03 20:40:00+02"),
            "2026-12-03T18:40:00.000000Z"
        );
        assert_eq!(
            rfc3339_from_pg("2026-12-03 18:10:00.5+05:30"),
            "2026-12-03T12:40:00.500000Z"
        );
        assert_eq!(rfc3339_from_pg("infinity"), "infinity");
    }
}
