//! pgoutput (protocol version 1) message decoding, zero-copy over the XLogData payload.
//!
//! The wire format is described in the PostgreSQL documentation, "Logical Replication Message
//! Formats". Integers are big-endian, strings are NUL-terminated, and column values and logical
//! decoding message contents are prefixed with an `Int32` length. Only protocol version 1 is
//! understood: the streaming (v2) and two-phase (v3) tags are reported as
//! [`DecodeError::UnknownTag`].
//!
//! [`decode`] never panics and never allocates in proportion to a length read from the input
//! before checking that length against the bytes that remain. Row messages (`Insert`, `Update`,
//! `Delete`) borrow their column values from the input buffer and do not allocate at all.

use std::fmt;
use std::iter::FusedIterator;

use bytes::BufMut;

/// One decoded pgoutput message, borrowing strings and column values from the input buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// `B`: start of a transaction.
    Begin(Begin),
    /// `C`: end of a transaction.
    Commit(Commit),
    /// `O`: replication origin of the current transaction.
    Origin {
        /// LSN of the commit on the origin server.
        commit_lsn: u64,
        /// Name of the origin.
        name: &'a str,
    },
    /// `R`: description of a relation, sent before the first row change that refers to it.
    Relation(Relation),
    /// `Y`: description of a non-built-in data type.
    Type {
        /// OID of the data type.
        oid: u32,
        /// Namespace of the data type (empty for `pg_catalog`).
        namespace: &'a str,
        /// Name of the data type.
        name: &'a str,
    },
    /// `I`: a row was inserted.
    Insert {
        /// OID of the relation.
        rel_id: u32,
        /// The new row.
        new: Tuple<'a>,
    },
    /// `U`: a row was updated.
    Update {
        /// OID of the relation.
        rel_id: u32,
        /// The old key (`K`) or old row (`O`), sent only when the replica identity requires it.
        old: Option<Tuple<'a>>,
        /// The new row.
        new: Tuple<'a>,
    },
    /// `D`: a row was deleted.
    Delete {
        /// OID of the relation.
        rel_id: u32,
        /// The old key (`K`) or old row (`O`).
        old: Tuple<'a>,
    },
    /// `T`: one or more relations were truncated.
    Truncate {
        /// Option bits: 1 for `CASCADE`, 2 for `RESTART IDENTITY`.
        options: u8,
        /// OIDs of the truncated relations.
        rel_ids: Vec<u32>,
    },
    /// `M`: a logical decoding message emitted by `pg_logical_emit_message`.
    Message {
        /// Whether the message was emitted inside the transaction.
        transactional: bool,
        /// LSN of the message.
        lsn: u64,
        /// Prefix of the message.
        prefix: &'a str,
        /// Content of the message.
        content: &'a [u8],
    },
}

/// Body of a `Begin` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// Final LSN of the transaction.
    pub final_lsn: u64,
    /// Commit timestamp in microseconds since 2000-01-01 00:00:00 UTC.
    pub commit_time: i64,
    /// Transaction id.
    pub xid: u32,
}

/// Body of a `Commit` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// Flags (currently unused by PostgreSQL, always 0).
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: u64,
    /// End LSN of the transaction.
    pub end_lsn: u64,
    /// Commit timestamp in microseconds since 2000-01-01 00:00:00 UTC.
    pub commit_time: i64,
}

/// Body of a `Relation` message; owned because it is rare and cached by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// OID of the relation.
    pub id: u32,
    /// Namespace of the relation (empty for `pg_catalog`).
    pub namespace: String,
    /// Name of the relation.
    pub name: String,
    /// Replica identity setting (`relreplident`: `d`, `n`, `f` or `i`).
    pub replica_identity: u8,
    /// Columns of the relation, in attribute order.
    pub columns: Vec<RelationColumn>,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Flags: 1 marks the column as part of the key.
    pub flags: u8,
    /// Name of the column.
    pub name: String,
    /// OID of the column's data type.
    pub type_oid: u32,
    /// Type modifier of the column (`atttypmod`).
    pub type_modifier: i32,
}

/// Which kind of tuple a [`Tuple`] is, from the byte that precedes its `TupleData`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TupleKind {
    /// `N`: a new row.
    New,
    /// `K`: the old key; columns outside the replica identity are sent as null.
    Key,
    /// `O`: the whole old row (replica identity full).
    Old,
}

impl TupleKind {
    /// The wire byte of this kind.
    pub fn tag(self) -> u8 {
        match self {
            TupleKind::New => b'N',
            TupleKind::Key => b'K',
            TupleKind::Old => b'O',
        }
    }

    fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            b'N' => Some(TupleKind::New),
            b'K' => Some(TupleKind::Key),
            b'O' => Some(TupleKind::Old),
            _ => None,
        }
    }
}

/// A `TupleData` borrowed from the input, validated when it was decoded.
///
/// Equality compares the encoded bytes, which is the same as comparing the columns because every
/// column has exactly one encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tuple<'a> {
    kind: TupleKind,
    count: u16,
    /// The column data that follows the `Int16` column count.
    data: &'a [u8],
}

impl<'a> Tuple<'a> {
    /// Validates a standalone `TupleData` (`Int16` count, then the columns) spanning all of `buf`.
    pub fn new(kind: TupleKind, buf: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let tuple = read_tuple_data(&mut r, kind)?;
        r.finish()?;
        Ok(tuple)
    }

    /// Whether this is a new row, an old key or an old row.
    pub fn kind(&self) -> TupleKind {
        self.kind
    }

    /// Number of columns.
    pub fn len(&self) -> usize {
        usize::from(self.count)
    }

    /// Whether the tuple has no columns.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Iterates over the columns in order.
    pub fn columns(&self) -> Columns<'a> {
        Columns {
            reader: Reader::new(self.data),
            remaining: self.count,
        }
    }

    /// The column at `index`, found by walking the preceding columns.
    pub fn get(&self, index: usize) -> Option<Column<'a>> {
        self.columns().nth(index)
    }
}

/// One column value of a [`Tuple`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Column<'a> {
    /// `n`: SQL null.
    Null,
    /// `u`: an unchanged TOASTed value whose data was not sent.
    UnchangedToast,
    /// `t`: a value in text format.
    Text(&'a [u8]),
    /// `b`: a value in binary format.
    Binary(&'a [u8]),
}

/// Iterator over the columns of a [`Tuple`].
#[derive(Debug, Clone)]
pub struct Columns<'a> {
    reader: Reader<'a>,
    remaining: u16,
}

impl<'a> Iterator for Columns<'a> {
    type Item = Column<'a>;

    fn next(&mut self) -> Option<Column<'a>> {
        if self.remaining == 0 {
            return None;
        }
        match read_column(&mut self.reader) {
            Ok(column) => {
                self.remaining -= 1;
                Some(column)
            }
            // Unreachable for a validated tuple; stop rather than panic.
            Err(_) => {
                self.remaining = 0;
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = usize::from(self.remaining);
        (n, Some(n))
    }
}

impl ExactSizeIterator for Columns<'_> {}

impl FusedIterator for Columns<'_> {}

/// Why a buffer is not a well-formed pgoutput v1 message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The buffer ended inside a field.
    #[error("truncated {what}")]
    Truncated {
        /// The field being read.
        what: &'static str,
    },
    /// The first byte is not a known protocol version 1 message tag.
    #[error("unknown message tag {}", Byte(*.0))]
    UnknownTag(u8),
    /// A tuple marker is not one of the kinds allowed at that place (`N`, `K`, `O`).
    #[error("bad tuple kind {}", Byte(*.0))]
    BadTupleKind(u8),
    /// A column marker is not `n`, `u`, `t` or `b`.
    #[error("bad column kind {}", Byte(*.0))]
    BadColumnKind(u8),
    /// A string is not valid UTF-8.
    #[error("invalid utf-8 in {what}")]
    InvalidUtf8 {
        /// The field being read.
        what: &'static str,
    },
    /// A string has no NUL terminator before the end of the buffer.
    #[error("missing nul terminator in {what}")]
    MissingNul {
        /// The field being read.
        what: &'static str,
    },
    /// The message was complete but bytes remain after it.
    #[error("{0} trailing bytes")]
    TrailingBytes(usize),
    /// A length or count field is negative.
    #[error("negative length {len} for {what}")]
    NegativeLength {
        /// The field being read.
        what: &'static str,
        /// The length that was read.
        len: i32,
    },
}

/// Shows a wire byte as a character when printable, otherwise in hex.
struct Byte(u8);

impl fmt::Display for Byte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}'", char::from(self.0))
        } else {
            write!(f, "{:#04x}", self.0)
        }
    }
}

/// Cursor over the input; every read checks the remaining length first.
#[derive(Debug, Clone)]
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let (head, tail) = self
            .buf
            .split_first_chunk::<N>()
            .ok_or(DecodeError::Truncated { what })?;
        self.buf = tail;
        Ok(*head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(what).map(|[b]| b)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.array(what).map(u16::from_be_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.array(what).map(u32::from_be_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.array(what).map(u64::from_be_bytes)
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.array(what).map(i32::from_be_bytes)
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.array(what).map(i64::from_be_bytes)
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError::Truncated { what });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// An `Int32` length that must not be negative.
    fn len32(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let len = self.i32(what)?;
        usize::try_from(len).map_err(|_| DecodeError::NegativeLength { what, len })
    }

    /// `Int32` length followed by that many bytes.
    fn len_prefixed(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.len32(what)?;
        self.bytes(len, what)
    }

    /// A NUL-terminated UTF-8 string; the terminator is consumed but not returned.
    fn cstr(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::MissingNul { what })?;
        let raw = self.bytes(end, what)?;
        self.bytes(1, what)?;
        std::str::from_utf8(raw).map_err(|_| DecodeError::InvalidUtf8 { what })
    }

    fn finish(self) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}

fn read_column<'a>(r: &mut Reader<'a>) -> Result<Column<'a>, DecodeError> {
    match r.u8("column kind")? {
        b'n' => Ok(Column::Null),
        b'u' => Ok(Column::UnchangedToast),
        b't' => r.len_prefixed("text column").map(Column::Text),
        b'b' => r.len_prefixed("binary column").map(Column::Binary),
        other => Err(DecodeError::BadColumnKind(other)),
    }
}

/// Reads `Int16` count and the columns, validating each one.
fn read_tuple_data<'a>(r: &mut Reader<'a>, kind: TupleKind) -> Result<Tuple<'a>, DecodeError> {
    let count = r.u16("tuple column count")?;
    let start = r.buf;
    for _ in 0..count {
        read_column(r)?;
    }
    let used = start.len() - r.remaining();
    let data = start
        .get(..used)
        .ok_or(DecodeError::Truncated { what: "tuple" })?;
    Ok(Tuple { kind, count, data })
}

/// Reads a tuple marker, which must be one of `allowed`, and the tuple that follows it.
fn read_tuple<'a>(r: &mut Reader<'a>, allowed: &[TupleKind]) -> Result<Tuple<'a>, DecodeError> {
    let tag = r.u8("tuple kind")?;
    match TupleKind::from_tag(tag) {
        Some(kind) if allowed.contains(&kind) => read_tuple_data(r, kind),
        _ => Err(DecodeError::BadTupleKind(tag)),
    }
}

fn read_relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    /// Smallest encoded column: flags, empty name with its NUL, type OID, type modifier.
    const MIN_COLUMN: usize = 1 + 1 + 4 + 4;
    let id = r.u32("relation id")?;
    let namespace = r.cstr("relation namespace")?.to_owned();
    let name = r.cstr("relation name")?.to_owned();
    let replica_identity = r.u8("replica identity")?;
    let count = usize::from(r.u16("relation column count")?);
    let mut columns = Vec::with_capacity(count.min(r.remaining() / MIN_COLUMN));
    for _ in 0..count {
        columns.push(RelationColumn {
            flags: r.u8("relation column flags")?,
            name: r.cstr("relation column name")?.to_owned(),
            type_oid: r.u32("relation column type")?,
            type_modifier: r.i32("relation column type modifier")?,
        });
    }
    Ok(Relation {
        id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn read_truncate<'a>(r: &mut Reader<'a>) -> Result<Message<'a>, DecodeError> {
    let count = r.len32("truncate relation count")?;
    let options = r.u8("truncate options")?;
    let needed = count.checked_mul(4);
    if needed.is_none_or(|n| n > r.remaining()) {
        return Err(DecodeError::Truncated {
            what: "truncate relation ids",
        });
    }
    let mut rel_ids = Vec::with_capacity(count);
    for _ in 0..count {
        rel_ids.push(r.u32("truncate relation ids")?);
    }
    Ok(Message::Truncate { options, rel_ids })
}

/// Decodes one whole message whose first byte is the tag; trailing bytes are an error.
pub fn decode(buf: &[u8]) -> Result<Message<'_>, DecodeError> {
    const OLD: &[TupleKind] = &[TupleKind::Key, TupleKind::Old];
    const NEW: &[TupleKind] = &[TupleKind::New];
    let mut r = Reader::new(buf);
    let msg = match r.u8("message tag")? {
        b'B' => Message::Begin(Begin {
            final_lsn: r.u64("begin final lsn")?,
            commit_time: r.i64("begin commit time")?,
            xid: r.u32("begin xid")?,
        }),
        b'C' => Message::Commit(Commit {
            flags: r.u8("commit flags")?,
            commit_lsn: r.u64("commit lsn")?,
            end_lsn: r.u64("commit end lsn")?,
            commit_time: r.i64("commit time")?,
        }),
        b'O' => Message::Origin {
            commit_lsn: r.u64("origin commit lsn")?,
            name: r.cstr("origin name")?,
        },
        b'R' => Message::Relation(read_relation(&mut r)?),
        b'Y' => Message::Type {
            oid: r.u32("type oid")?,
            namespace: r.cstr("type namespace")?,
            name: r.cstr("type name")?,
        },
        b'I' => Message::Insert {
            rel_id: r.u32("insert relation id")?,
            new: read_tuple(&mut r, NEW)?,
        },
        b'U' => {
            let rel_id = r.u32("update relation id")?;
            let first = read_tuple(&mut r, &[TupleKind::Key, TupleKind::Old, TupleKind::New])?;
            if first.kind == TupleKind::New {
                Message::Update {
                    rel_id,
                    old: None,
                    new: first,
                }
            } else {
                Message::Update {
                    rel_id,
                    old: Some(first),
                    new: read_tuple(&mut r, NEW)?,
                }
            }
        }
        b'D' => Message::Delete {
            rel_id: r.u32("delete relation id")?,
            old: read_tuple(&mut r, OLD)?,
        },
        b'T' => read_truncate(&mut r)?,
        b'M' => Message::Message {
            transactional: r.u8("message flags")? & 1 != 0,
            lsn: r.u64("message lsn")?,
            prefix: r.cstr("message prefix")?,
            content: r.len_prefixed("message content")?,
        },
        other => return Err(DecodeError::UnknownTag(other)),
    };
    r.finish()?;
    Ok(msg)
}

/// Writes `columns` as a `TupleData` (`Int16` count, then each column) for [`Tuple::new`].
///
/// At most `u16::MAX` columns and values shorter than 2 GiB are representable.
pub fn encode_tuple_data(columns: &[Column<'_>], out: &mut Vec<u8>) {
    out.put_u16(columns.len() as u16);
    for column in columns {
        match column {
            Column::Null => out.put_u8(b'n'),
            Column::UnchangedToast => out.put_u8(b'u'),
            Column::Text(value) => put_len_prefixed(out, b't', value),
            Column::Binary(value) => put_len_prefixed(out, b'b', value),
        }
    }
}

fn put_len_prefixed(out: &mut Vec<u8>, tag: u8, value: &[u8]) {
    out.put_u8(tag);
    out.put_i32(value.len() as i32);
    out.put_slice(value);
}

fn put_cstr(out: &mut Vec<u8>, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

fn put_tuple(out: &mut Vec<u8>, kind: TupleKind, tuple: &Tuple<'_>) {
    out.put_u8(kind.tag());
    out.put_u16(tuple.count);
    out.put_slice(tuple.data);
}

/// Encoder used by tests and benchmarks to build well-formed messages.
///
/// Strings must not contain NUL. New tuples are always written with the `N` marker and old tuples
/// with their own kind, which must be [`TupleKind::Key`] or [`TupleKind::Old`].
pub fn encode(msg: &Message<'_>, out: &mut Vec<u8>) {
    match msg {
        Message::Begin(b) => {
            out.put_u8(b'B');
            out.put_u64(b.final_lsn);
            out.put_i64(b.commit_time);
            out.put_u32(b.xid);
        }
        Message::Commit(c) => {
            out.put_u8(b'C');
            out.put_u8(c.flags);
            out.put_u64(c.commit_lsn);
            out.put_u64(c.end_lsn);
            out.put_i64(c.commit_time);
        }
        Message::Origin { commit_lsn, name } => {
            out.put_u8(b'O');
            out.put_u64(*commit_lsn);
            put_cstr(out, name);
        }
        Message::Relation(rel) => {
            out.put_u8(b'R');
            out.put_u32(rel.id);
            put_cstr(out, &rel.namespace);
            put_cstr(out, &rel.name);
            out.put_u8(rel.replica_identity);
            out.put_u16(rel.columns.len() as u16);
            for column in &rel.columns {
                out.put_u8(column.flags);
                put_cstr(out, &column.name);
                out.put_u32(column.type_oid);
                out.put_i32(column.type_modifier);
            }
        }
        Message::Type {
            oid,
            namespace,
            name,
        } => {
            out.put_u8(b'Y');
            out.put_u32(*oid);
            put_cstr(out, namespace);
            put_cstr(out, name);
        }
        Message::Insert { rel_id, new } => {
            out.put_u8(b'I');
            out.put_u32(*rel_id);
            put_tuple(out, TupleKind::New, new);
        }
        Message::Update { rel_id, old, new } => {
            out.put_u8(b'U');
            out.put_u32(*rel_id);
            if let Some(old) = old {
                put_tuple(out, old.kind, old);
            }
            put_tuple(out, TupleKind::New, new);
        }
        Message::Delete { rel_id, old } => {
            out.put_u8(b'D');
            out.put_u32(*rel_id);
            put_tuple(out, old.kind, old);
        }
        Message::Truncate { options, rel_ids } => {
            out.put_u8(b'T');
            out.put_i32(rel_ids.len() as i32);
            out.put_u8(*options);
            for id in rel_ids {
                out.put_u32(*id);
            }
        }
        Message::Message {
            transactional,
            lsn,
            prefix,
            content,
        } => {
            out.put_u8(b'M');
            out.put_u8(u8::from(*transactional));
            out.put_u64(*lsn);
            put_cstr(out, prefix);
            out.put_i32(content.len() as i32);
            out.put_slice(content);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encoded(msg: &Message<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        encode(msg, &mut out);
        out
    }

    fn cols<'a>(tuple: &Tuple<'a>) -> Vec<Column<'a>> {
        tuple.columns().collect()
    }

    /// Decodes `bytes`, checks the result, and checks that encoding gives back the same bytes.
    fn check(bytes: &[u8], expected: &Message<'_>) {
        let msg = decode(bytes).expect("decode");
        assert_eq!(&msg, expected);
        assert_eq!(encoded(&msg), bytes);
    }

    #[test]
    fn begin() {
        let bytes = [
            b'B', 0, 0, 0, 0, 0x01, 0x6A, 0x2B, 0x40, // final lsn 0/16A2B40
            0, 0x02, 0xA0, 0x3C, 0x1B, 0x2D, 0x3E, 0x4F, // commit time
            0, 0, 0x02, 0xE5, // xid 741
        ];
        let expected = Message::Begin(Begin {
            final_lsn: 0x016A_2B40,
            commit_time: 0x0002_A03C_1B2D_3E4F,
            xid: 741,
        });
        check(&bytes, &expected);
    }

    #[test]
    fn commit() {
        let bytes = [
            b'C', 0, // flags
            0, 0, 0, 0, 0x01, 0x6A, 0x2B, 0x40, // commit lsn
            0, 0, 0, 0, 0x01, 0x6A, 0x2B, 0x70, // end lsn
            0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFE, // commit time -2
        ];
        let expected = Message::Commit(Commit {
            flags: 0,
            commit_lsn: 0x016A_2B40,
            end_lsn: 0x016A_2B70,
            commit_time: -2,
        });
        check(&bytes, &expected);
    }

    #[test]
    fn origin() {
        let mut bytes = vec![b'O', 0, 0, 0, 1, 0, 0, 0, 2];
        bytes.extend_from_slice(b"node_a\0");
        let expected = Message::Origin {
            commit_lsn: 0x0000_0001_0000_0002,
            name: "node_a",
        };
        check(&bytes, &expected);
    }

    #[test]
    fn relation() {
        let mut bytes = vec![b'R', 0, 0, 0x40, 0x01];
        bytes.extend_from_slice(b"public\0orders\0");
        bytes.extend_from_slice(&[b'd', 0, 2]);
        bytes.extend_from_slice(&[1]);
        bytes.extend_from_slice(b"id\0");
        bytes.extend_from_slice(&[0, 0, 0, 20, 0xFF, 0xFF, 0xFF, 0xFF]); // int8, typmod -1
        bytes.extend_from_slice(&[0]);
        bytes.extend_from_slice(b"note\0");
        bytes.extend_from_slice(&[0, 0, 0x04, 0x13, 0, 0, 0, 36]); // varchar(32)
        let expected = Message::Relation(Relation {
            id: 16385,
            namespace: "public".into(),
            name: "orders".into(),
            replica_identity: b'd',
            columns: vec![
                RelationColumn {
                    flags: 1,
                    name: "id".into(),
                    type_oid: 20,
                    type_modifier: -1,
                },
                RelationColumn {
                    flags: 0,
                    name: "note".into(),
                    type_oid: 1043,
                    type_modifier: 36,
                },
            ],
        });
        check(&bytes, &expected);
    }

    #[test]
    fn type_message() {
        let mut bytes = vec![b'Y', 0, 0, 0x40, 0x10];
        bytes.extend_from_slice(b"public\0mood\0");
        let expected = Message::Type {
            oid: 16400,
            namespace: "public",
            name: "mood",
        };
        check(&bytes, &expected);
    }

    #[test]
    fn insert_with_every_column_kind() {
        let bytes = [
            b'I', 0, 0, 0x40, 0x00, // relation 16384
            b'N', 0, 4,    // four columns
            b'n', // null
            b'u', // unchanged toast
            b't', 0, 0, 0, 2, b'4', b'2', // text "42"
            b'b', 0, 0, 0, 3, 1, 2, 3, // binary
        ];
        let msg = decode(&bytes).unwrap();
        let Message::Insert { rel_id, new } = &msg else {
            panic!("not an insert: {msg:?}");
        };
        assert_eq!(*rel_id, 16384);
        assert_eq!(new.kind(), TupleKind::New);
        assert_eq!(new.len(), 4);
        assert!(!new.is_empty());
        assert_eq!(
            cols(new),
            [
                Column::Null,
                Column::UnchangedToast,
                Column::Text(b"42"),
                Column::Binary(&[1, 2, 3]),
            ]
        );
        assert_eq!(new.columns().len(), 4);
        assert_eq!(new.get(2), Some(Column::Text(b"42")));
        assert_eq!(new.get(3), Some(Column::Binary(&[1, 2, 3])));
        assert_eq!(new.get(4), None);
        // The values borrow from the input buffer.
        let Some(Column::Text(text)) = new.get(2) else {
            panic!("column 2 is not text");
        };
        assert_eq!(text.as_ptr(), bytes[15..].as_ptr());
        assert_eq!(encoded(&msg), bytes);
    }

    #[test]
    fn insert_with_no_columns() {
        let bytes = [b'I', 0, 0, 0, 7, b'N', 0, 0];
        let msg = decode(&bytes).unwrap();
        let Message::Insert { rel_id: 7, new } = msg else {
            panic!("not an insert of 7: {msg:?}");
        };
        assert!(new.is_empty());
        assert_eq!(new.columns().next(), None);
    }

    #[test]
    fn update_without_old_tuple() {
        let bytes = [
            b'U', 0, 0, 0x40, 0x00, b'N', 0, 2, b't', 0, 0, 0, 1, b'1', b'n',
        ];
        let msg = decode(&bytes).unwrap();
        let Message::Update { rel_id, old, new } = &msg else {
            panic!("not an update: {msg:?}");
        };
        assert_eq!(*rel_id, 16384);
        assert_eq!(*old, None);
        assert_eq!(cols(new), [Column::Text(b"1"), Column::Null]);
        assert_eq!(encoded(&msg), bytes);
    }

    #[test]
    fn update_with_old_key_and_old_row() {
        for (tag, kind) in [(b'K', TupleKind::Key), (b'O', TupleKind::Old)] {
            let bytes = [
                b'U', 0, 0, 0x40, 0x00, // relation
                tag, 0, 2, b't', 0, 0, 0, 1, b'1', b'n', // old
                b'N', 0, 2, b't', 0, 0, 0, 1, b'2', b'u', // new
            ];
            let msg = decode(&bytes).unwrap();
            let Message::Update { rel_id, old, new } = &msg else {
                panic!("not an update: {msg:?}");
            };
            assert_eq!(*rel_id, 16384);
            let old = old.expect("old tuple");
            assert_eq!(old.kind(), kind);
            assert_eq!(cols(&old), [Column::Text(b"1"), Column::Null]);
            assert_eq!(new.kind(), TupleKind::New);
            assert_eq!(cols(new), [Column::Text(b"2"), Column::UnchangedToast]);
            assert_eq!(encoded(&msg), bytes);
        }
    }

    #[test]
    fn update_rejects_two_old_tuples() {
        let bytes = [b'U', 0, 0, 0, 1, b'K', 0, 0, b'O', 0, 0];
        assert_eq!(decode(&bytes), Err(DecodeError::BadTupleKind(b'O')));
    }

    #[test]
    fn delete_with_key_and_old_row() {
        for (tag, kind) in [(b'K', TupleKind::Key), (b'O', TupleKind::Old)] {
            let bytes = [
                b'D', 0, 0, 0x40, 0x02, tag, 0, 2, b't', 0, 0, 0, 2, b'9', b'9', b'n',
            ];
            let msg = decode(&bytes).unwrap();
            let Message::Delete { rel_id, old } = &msg else {
                panic!("not a delete: {msg:?}");
            };
            assert_eq!(*rel_id, 16386);
            assert_eq!(old.kind(), kind);
            assert_eq!(cols(old), [Column::Text(b"99"), Column::Null]);
            assert_eq!(encoded(&msg), bytes);
        }
        let new_marker = [b'D', 0, 0, 0x40, 0x02, b'N', 0, 0];
        assert_eq!(decode(&new_marker), Err(DecodeError::BadTupleKind(b'N')));
    }

    #[test]
    fn truncate_two_relations() {
        let bytes = [
            b'T', 0, 0, 0, 2, // two relations
            3, // cascade | restart identity
            0, 0, 0x40, 0x00, 0, 0, 0x40, 0x01,
        ];
        let expected = Message::Truncate {
            options: 3,
            rel_ids: vec![16384, 16385],
        };
        check(&bytes, &expected);
    }

    #[test]
    fn logical_message() {
        let mut bytes = vec![b'M', 1, 0, 0, 0, 0, 0x01, 0x6A, 0x2B, 0x40];
        bytes.extend_from_slice(b"walpush\0");
        bytes.extend_from_slice(&[0, 0, 0, 5]);
        bytes.extend_from_slice(b"hello");
        let expected = Message::Message {
            transactional: true,
            lsn: 0x016A_2B40,
            prefix: "walpush",
            content: b"hello",
        };
        check(&bytes, &expected);

        let mut plain = vec![b'M', 0, 0, 0, 0, 0, 0, 0, 0, 9, b'p', 0, 0, 0, 0, 0];
        let msg = decode(&plain).unwrap();
        assert_eq!(
            msg,
            Message::Message {
                transactional: false,
                lsn: 9,
                prefix: "p",
                content: b"",
            }
        );
        plain.push(0);
        assert_eq!(decode(&plain), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn streaming_and_unknown_tags_are_rejected() {
        for tag in [b'S', b'E', b'c', b'A', b'P', b'K', b'r', 0, 0xFF] {
            let bytes = [tag, 0, 0, 0, 1, 0, 0, 0, 0];
            assert_eq!(decode(&bytes), Err(DecodeError::UnknownTag(tag)));
        }
        assert_eq!(
            decode(&[]),
            Err(DecodeError::Truncated {
                what: "message tag"
            })
        );
    }

    #[test]
    fn bad_column_kind() {
        let bytes = [b'I', 0, 0, 0, 1, b'N', 0, 1, b'x'];
        assert_eq!(decode(&bytes), Err(DecodeError::BadColumnKind(b'x')));
    }

    #[test]
    fn negative_lengths_are_rejected() {
        let column = [b'I', 0, 0, 0, 1, b'N', 0, 1, b't', 0xFF, 0xFF, 0xFF, 0xFF];
        assert_eq!(
            decode(&column),
            Err(DecodeError::NegativeLength {
                what: "text column",
                len: -1
            })
        );
        let content = [b'M', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80, 0, 0, 0];
        assert_eq!(
            decode(&content),
            Err(DecodeError::NegativeLength {
                what: "message content",
                len: i32::MIN
            })
        );
        let truncate = [b'T', 0xFF, 0xFF, 0xFF, 0xFE, 0];
        assert_eq!(
            decode(&truncate),
            Err(DecodeError::NegativeLength {
                what: "truncate relation count",
                len: -2
            })
        );
    }

    #[test]
    fn huge_lengths_fail_before_allocating() {
        let truncate = [b'T', 0x7F, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0, 1];
        assert_eq!(
            decode(&truncate),
            Err(DecodeError::Truncated {
                what: "truncate relation ids"
            })
        );
        let column = [
            b'I', 0, 0, 0, 1, b'N', 0, 1, b'b', 0x7F, 0xFF, 0xFF, 0xFF, 1,
        ];
        assert_eq!(
            decode(&column),
            Err(DecodeError::Truncated {
                what: "binary column"
            })
        );
        let mut relation = vec![b'R', 0, 0, 0, 1, 0, 0, b'f', 0xFF, 0xFF];
        relation.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            decode(&relation),
            Err(DecodeError::Truncated {
                what: "relation column flags"
            })
        );
    }

    #[test]
    fn strings_must_be_terminated_and_utf8() {
        let unterminated = [b'O', 0, 0, 0, 0, 0, 0, 0, 1, b'a', b'b'];
        assert_eq!(
            decode(&unterminated),
            Err(DecodeError::MissingNul {
                what: "origin name"
            })
        );
        let invalid = [b'Y', 0, 0, 0, 1, 0xC3, 0x28, 0, b'x', 0];
        assert_eq!(
            decode(&invalid),
            Err(DecodeError::InvalidUtf8 {
                what: "type namespace"
            })
        );
    }

    #[test]
    fn tuple_new_validates_whole_buffer() {
        let mut data = Vec::new();
        encode_tuple_data(&[Column::Text(b"x"), Column::Null], &mut data);
        let tuple = Tuple::new(TupleKind::Old, &data).unwrap();
        assert_eq!(tuple.kind(), TupleKind::Old);
        assert_eq!(cols(&tuple), [Column::Text(b"x"), Column::Null]);
        data.push(b'n');
        assert_eq!(
            Tuple::new(TupleKind::Old, &data),
            Err(DecodeError::TrailingBytes(1))
        );
        // Claims three columns but carries two.
        data[1] = 3;
        data.pop();
        assert_eq!(
            Tuple::new(TupleKind::New, &data),
            Err(DecodeError::Truncated {
                what: "column kind"
            })
        );
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            DecodeError::UnknownTag(b'S').to_string(),
            "unknown message tag 'S'"
        );
        assert_eq!(
            DecodeError::BadColumnKind(0).to_string(),
            "bad column kind 0x00"
        );
        assert_eq!(
            DecodeError::Truncated {
                what: "origin name"
            }
            .to_string(),
            "truncated origin name"
        );
    }

    // ---- property tests -------------------------------------------------------------------

    /// Owned data from which a borrowed `Message` is built for each case.
    #[derive(Debug, Clone)]
    enum Spec {
        Begin(Begin),
        Commit(Commit),
        Origin(u64, String),
        Relation(Relation),
        Type(u32, String, String),
        Insert(u32, OwnedTuple),
        Update(u32, Option<OwnedTuple>, OwnedTuple),
        Delete(u32, OwnedTuple),
        Truncate(u8, Vec<u32>),
        Message(bool, u64, String, Vec<u8>),
    }

    #[derive(Debug, Clone)]
    enum OwnedColumn {
        Null,
        UnchangedToast,
        Text(Vec<u8>),
        Binary(Vec<u8>),
    }

    impl OwnedColumn {
        fn borrow(&self) -> Column<'_> {
            match self {
                OwnedColumn::Null => Column::Null,
                OwnedColumn::UnchangedToast => Column::UnchangedToast,
                OwnedColumn::Text(v) => Column::Text(v),
                OwnedColumn::Binary(v) => Column::Binary(v),
            }
        }
    }

    #[derive(Debug, Clone)]
    struct OwnedTuple {
        kind: TupleKind,
        columns: Vec<OwnedColumn>,
        data: Vec<u8>,
    }

    impl OwnedTuple {
        fn new(kind: TupleKind, columns: Vec<OwnedColumn>) -> Self {
            let borrowed: Vec<Column<'_>> = columns.iter().map(OwnedColumn::borrow).collect();
            let mut data = Vec::new();
            encode_tuple_data(&borrowed, &mut data);
            OwnedTuple {
                kind,
                columns,
                data,
            }
        }

        fn tuple(&self) -> Tuple<'_> {
            Tuple::new(self.kind, &self.data).expect("encoded tuple data is valid")
        }

        fn assert_columns(&self, tuple: &Tuple<'_>) {
            let expected: Vec<Column<'_>> = self.columns.iter().map(OwnedColumn::borrow).collect();
            assert_eq!(tuple.kind(), self.kind);
            assert_eq!(tuple.len(), expected.len());
            assert_eq!(cols(tuple), expected);
            for (i, column) in expected.iter().enumerate() {
                assert_eq!(tuple.get(i), Some(*column));
            }
        }
    }

    impl Spec {
        fn message(&self) -> Message<'_> {
            match self {
                Spec::Begin(b) => Message::Begin(*b),
                Spec::Commit(c) => Message::Commit(*c),
                Spec::Origin(lsn, name) => Message::Origin {
                    commit_lsn: *lsn,
                    name,
                },
                Spec::Relation(r) => Message::Relation(r.clone()),
                Spec::Type(oid, namespace, name) => Message::Type {
                    oid: *oid,
                    namespace,
                    name,
                },
                Spec::Insert(rel_id, new) => Message::Insert {
                    rel_id: *rel_id,
                    new: new.tuple(),
                },
                Spec::Update(rel_id, old, new) => Message::Update {
                    rel_id: *rel_id,
                    old: old.as_ref().map(OwnedTuple::tuple),
                    new: new.tuple(),
                },
                Spec::Delete(rel_id, old) => Message::Delete {
                    rel_id: *rel_id,
                    old: old.tuple(),
                },
                Spec::Truncate(options, ids) => Message::Truncate {
                    options: *options,
                    rel_ids: ids.clone(),
                },
                Spec::Message(transactional, lsn, prefix, content) => Message::Message {
                    transactional: *transactional,
                    lsn: *lsn,
                    prefix,
                    content,
                },
            }
        }
    }

    fn text() -> impl Strategy<Value = String> {
        prop::collection::vec(any::<char>(), 0..12)
            .prop_map(|chars| chars.into_iter().filter(|&c| c != '\0').collect())
    }

    fn value() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), 0..24)
    }

    fn column() -> impl Strategy<Value = OwnedColumn> {
        prop_oneof![
            Just(OwnedColumn::Null),
            Just(OwnedColumn::UnchangedToast),
            value().prop_map(OwnedColumn::Text),
            value().prop_map(OwnedColumn::Binary),
        ]
    }

    fn tuple(kinds: &'static [TupleKind]) -> impl Strategy<Value = OwnedTuple> {
        (
            prop::sample::select(kinds),
            prop::collection::vec(column(), 0..8),
        )
            .prop_map(|(kind, columns)| OwnedTuple::new(kind, columns))
    }

    fn new_tuple() -> impl Strategy<Value = OwnedTuple> {
        tuple(&[TupleKind::New])
    }

    fn old_tuple() -> impl Strategy<Value = OwnedTuple> {
        tuple(&[TupleKind::Key, TupleKind::Old])
    }

    fn relation_spec() -> impl Strategy<Value = Relation> {
        let column = (any::<u8>(), text(), any::<u32>(), any::<i32>()).prop_map(
            |(flags, name, type_oid, type_modifier)| RelationColumn {
                flags,
                name,
                type_oid,
                type_modifier,
            },
        );
        (
            any::<u32>(),
            text(),
            text(),
            any::<u8>(),
            prop::collection::vec(column, 0..6),
        )
            .prop_map(
                |(id, namespace, name, replica_identity, columns)| Relation {
                    id,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                },
            )
    }

    fn spec() -> impl Strategy<Value = Spec> {
        prop_oneof![
            (any::<u64>(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| {
                Spec::Begin(Begin {
                    final_lsn,
                    commit_time,
                    xid,
                })
            }),
            (any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>()).prop_map(
                |(flags, commit_lsn, end_lsn, commit_time)| Spec::Commit(Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                })
            ),
            (any::<u64>(), text()).prop_map(|(lsn, name)| Spec::Origin(lsn, name)),
            relation_spec().prop_map(Spec::Relation),
            (any::<u32>(), text(), text()).prop_map(|(oid, ns, name)| Spec::Type(oid, ns, name)),
            (any::<u32>(), new_tuple()).prop_map(|(rel, new)| Spec::Insert(rel, new)),
            (any::<u32>(), prop::option::of(old_tuple()), new_tuple())
                .prop_map(|(rel, old, new)| Spec::Update(rel, old, new)),
            (any::<u32>(), old_tuple()).prop_map(|(rel, old)| Spec::Delete(rel, old)),
            (any::<u8>(), prop::collection::vec(any::<u32>(), 0..6))
                .prop_map(|(options, ids)| Spec::Truncate(options, ids)),
            (any::<bool>(), any::<u64>(), text(), value())
                .prop_map(|(t, lsn, prefix, content)| Spec::Message(t, lsn, prefix, content)),
        ]
    }

    /// Byte vectors that often start with a real tag so decoding gets past the first byte.
    fn junk() -> impl Strategy<Value = Vec<u8>> {
        let tags = b"BCORYIUDTMSEcAKNntub".to_vec();
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            (
                prop::sample::select(tags),
                prop::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(tag, mut rest)| {
                    rest.insert(0, tag);
                    rest
                }),
        ]
    }

    proptest! {
        #[test]
        fn roundtrip(spec in spec()) {
            let msg = spec.message();
            let bytes = encoded(&msg);
            let decoded = decode(&bytes);
            prop_assert_eq!(decoded.as_ref(), Ok(&msg));
            match (&spec, decoded.unwrap()) {
                (Spec::Insert(_, owned), Message::Insert { new, .. }) => owned.assert_columns(&new),
                (Spec::Update(_, owned_old, owned_new), Message::Update { old, new, .. }) => {
                    prop_assert_eq!(owned_old.is_some(), old.is_some());
                    if let (Some(owned), Some(old)) = (owned_old, old) {
                        owned.assert_columns(&old);
                    }
                    owned_new.assert_columns(&new);
                }
                (Spec::Delete(_, owned), Message::Delete { old, .. }) => owned.assert_columns(&old),
                _ => {}
            }
        }

        #[test]
        fn every_strict_prefix_is_an_error(spec in spec()) {
            let bytes = encoded(&spec.message());
            for end in 0..bytes.len() {
                prop_assert!(decode(&bytes[..end]).is_err(), "prefix of {} bytes decoded", end);
            }
        }

        #[test]
        fn a_trailing_byte_is_an_error(spec in spec(), extra in any::<u8>()) {
            let mut bytes = encoded(&spec.message());
            bytes.push(extra);
            prop_assert_eq!(decode(&bytes), Err(DecodeError::TrailingBytes(1)));
        }

        #[test]
        fn arbitrary_bytes_do_not_panic(bytes in junk()) {
            if let Ok(msg) = decode(&bytes) {
                // Anything accepted other than a message (whose flag byte may hold other bits)
                // is canonical: it encodes back to the same bytes.
                if !matches!(msg, Message::Message { .. }) {
                    prop_assert_eq!(encoded(&msg), bytes);
                }
            }
        }

        #[test]
        fn corrupted_messages_do_not_panic(
            spec in spec(),
            index in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut bytes = encoded(&spec.message());
            let i = index.index(bytes.len());
            bytes[i] = byte;
            if let Ok(msg) = decode(&bytes) {
                // The message flag byte is the only field with several encodings of one value.
                if !matches!(msg, Message::Message { .. }) {
                    prop_assert_eq!(encoded(&msg), bytes);
                }
            }
        }
    }
}
