//! Log sequence numbers, written as PostgreSQL prints them (`0/16B3748`).

use std::fmt;
use std::str::FromStr;

use tokio_postgres::types::PgLsn;

/// A position in the write-ahead log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

/// Text that is not an LSN.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not an LSN: write it as PostgreSQL prints one, e.g. 0/16B3748")]
pub struct ParseLsnError(String);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Lsn, ParseLsnError> {
        let err = || ParseLsnError(s.to_owned());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u64::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((hi << 32) | lo))
    }
}

impl From<Lsn> for PgLsn {
    fn from(lsn: Lsn) -> PgLsn {
        PgLsn::from(lsn.0)
    }
}

impl From<PgLsn> for Lsn {
    fn from(lsn: PgLsn) -> Lsn {
        Lsn(u64::from(lsn))
    }
}

impl From<pgwire_replication::Lsn> for Lsn {
    fn from(lsn: pgwire_replication::Lsn) -> Lsn {
        Lsn(lsn.as_u64())
    }
}

impl From<Lsn> for pgwire_replication::Lsn {
    fn from(lsn: Lsn) -> pgwire_replication::Lsn {
        pgwire_replication::Lsn::from_u64(lsn.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_and_parses_like_postgres() {
        let lsn: Lsn = "0/16B3748".parse().unwrap();
        assert_eq!(lsn, Lsn(0x16B3748));
        assert_eq!(lsn.to_string(), "0/16B3748");
        assert_eq!(Lsn(0x1_0000_00FF).to_string(), "1/FF");
        assert_eq!("1/ff".parse::<Lsn>().unwrap(), Lsn(0x1_0000_00FF));
    }

    #[test]
    fn refuses_what_is_not_an_lsn() {
        for bad in ["", "16B3748", "0/", "/1", "x/1", "0/1/2", "123456789/0"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} parsed");
        }
    }
}
