//! Serde through `FromStr`/`Display`, so the API (and anything else that
//! serialises these types) accepts and prints exactly what the CLI and the
//! config file do: `#[serde(with = "crate::config::text")]`, or
//! `text::opt` for an `Option`.

use serde::{de::Error, Deserialize, Deserializer, Serializer};
use std::{fmt::Display, str::FromStr};

/// Serialise as the value's `Display`.
pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// Deserialise a string with `FromStr` (its one-line error as is).
pub fn deserialize<'de, T: FromStr, D: Deserializer<'de>>(d: D) -> Result<T, D::Error>
where
    T::Err: Display,
{
    let s = String::deserialize(d)?;
    s.parse().map_err(|e: T::Err| D::Error::custom(format!("{e:#}")))
}

/// The same for an optional value.
pub mod opt {
    use super::*;

    /// Serialise `Some` as the value's `Display`, `None` as null.
    pub fn serialize<T: Display, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    /// Deserialise null or a string with `FromStr`.
    pub fn deserialize<'de, T: FromStr, D: Deserializer<'de>>(d: D) -> Result<Option<T>, D::Error>
    where
        T::Err: Display,
    {
        match Option::<String>::deserialize(d)? {
            Some(s) => s.parse().map(Some).map_err(|e: T::Err| D::Error::custom(format!("{e:#}"))),
            None => Ok(None),
        }
    }
}
