//! Which scenarios a run takes: `--filter` (exact id or regex) and `--partition` (like nextest:
//! `hash:i/N` buckets by a stable hash of the id, `count:i/N` deals the sorted list round-robin;
//! shards are numbered from 1).

use std::str::FromStr;

use regex::Regex;

/// A shard of the corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Partition {
    /// Scenarios whose id hashes to bucket `shard` of `total`.
    Hash {
        /// 1-based shard.
        shard: u64,
        /// Number of shards.
        total: u64,
    },
    /// Every `total`-th scenario of the sorted list, starting at `shard`.
    Count {
        /// 1-based shard.
        shard: u64,
        /// Number of shards.
        total: u64,
    },
}

/// Why a partition does not parse; each says what the syntax is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{problem}; expected hash:I/N or count:I/N with 1 <= I <= N")]
pub struct PartitionError {
    /// What is wrong with it.
    pub problem: PartitionProblem,
}

/// What is wrong with a partition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartitionProblem {
    /// No `kind:` prefix.
    #[error("missing `hash:` or `count:`")]
    MissingKind,
    /// No `/N`.
    #[error("missing `/N`")]
    MissingTotal,
    /// I is not a number.
    #[error("shard {0:?} is not a number")]
    ShardNotANumber(String),
    /// N is not a number.
    #[error("total {0:?} is not a number")]
    TotalNotANumber(String),
    /// N is 0.
    #[error("N must be at least 1")]
    ZeroTotal,
    /// I is not in 1..=N.
    #[error("shard {shard} is outside 1..={total}")]
    ShardOutOfRange {
        /// I.
        shard: u64,
        /// N.
        total: u64,
    },
    /// Neither `hash` nor `count`.
    #[error("unknown kind {0:?}")]
    UnknownKind(String),
}

impl From<PartitionProblem> for PartitionError {
    fn from(problem: PartitionProblem) -> Self {
        PartitionError { problem }
    }
}

impl FromStr for Partition {
    type Err = PartitionError;

    fn from_str(s: &str) -> Result<Partition, PartitionError> {
        use PartitionProblem as P;
        let (kind, rest) = s.split_once(':').ok_or(P::MissingKind)?;
        let (i, n) = rest.split_once('/').ok_or(P::MissingTotal)?;
        let shard: u64 = i.parse().map_err(|_| P::ShardNotANumber(i.into()))?;
        let total: u64 = n.parse().map_err(|_| P::TotalNotANumber(n.into()))?;
        if total == 0 {
            return Err(P::ZeroTotal.into());
        }
        if shard == 0 || shard > total {
            return Err(P::ShardOutOfRange { shard, total }.into());
        }
        match kind {
            "hash" => Ok(Partition::Hash { shard, total }),
            "count" => Ok(Partition::Count { shard, total }),
            other => Err(P::UnknownKind(other.into()).into()),
        }
    }
}

/// FNV-1a, 64-bit: stable across builds, platforms and Rust versions (std's hasher is not).
pub fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Partition {
    /// Keeps this shard's ids out of `ids` (which need not be sorted).
    pub fn select<'a>(&self, ids: &[&'a str]) -> Vec<&'a str> {
        match *self {
            Partition::Hash { shard, total } => ids
                .iter()
                .copied()
                .filter(|id| stable_hash(id) % total == shard - 1)
                .collect(),
            Partition::Count { shard, total } => {
                let mut sorted = ids.to_vec();
                sorted.sort_unstable();
                sorted
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| *i as u64 % total == shard - 1)
                    .map(|(_, id)| id)
                    .collect()
            }
        }
    }
}

/// One `--filter`: an exact id, else a regex searched in the id.
#[derive(Debug, Clone)]
pub struct Filter {
    text: String,
    regex: Option<Regex>,
}

/// A filter that is not a valid regex (an id is always one).
#[derive(Debug, Clone, thiserror::Error)]
#[error("neither an id nor a valid regex ({})", short_reason(.0))]
pub struct FilterError(#[source] pub regex::Error);

/// The regex error's one-line reason (its `error: ` line), without the pattern drawing.
fn short_reason(e: &regex::Error) -> String {
    e.to_string()
        .lines()
        .find_map(|l| l.trim().strip_prefix("error: "))
        .unwrap_or("invalid")
        .to_string()
}

impl FromStr for Filter {
    type Err = FilterError;

    fn from_str(s: &str) -> Result<Filter, FilterError> {
        let regex = Regex::new(s).map_err(FilterError)?;
        Ok(Filter {
            text: s.to_string(),
            regex: Some(regex),
        })
    }
}

impl Filter {
    /// Whether `id` is selected.
    pub fn matches(&self, id: &str) -> bool {
        self.text == id || self.regex.as_ref().is_some_and(|r| r.is_match(id))
    }

    /// The filter as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_parse_and_reject_out_of_range_shards() {
        assert_eq!(
            "hash:1/2".parse(),
            Ok(Partition::Hash { shard: 1, total: 2 })
        );
        assert_eq!(
            "count:2/2".parse(),
            Ok(Partition::Count { shard: 2, total: 2 })
        );
        assert_eq!(
            "hash:3/2".parse::<Partition>().map_err(|e| e.to_string()),
            Err("shard 3 is outside 1..=2; expected hash:I/N or count:I/N with 1 <= I <= N".into())
        );
        assert!("count:0/2".parse::<Partition>().is_err());
        assert!("hash:1/0".parse::<Partition>().is_err());
        assert!("3/2".parse::<Partition>().is_err());
        assert!("mod:1/2".parse::<Partition>().is_err());
    }

    #[test]
    fn shards_cover_every_id_exactly_once() {
        let ids: Vec<String> = (0..50).map(|i| format!("scenario-{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        for kind in ["hash", "count"] {
            let mut all = Vec::new();
            for shard in 1..=3 {
                let p: Partition = format!("{kind}:{shard}/3").parse().expect("valid");
                all.extend(p.select(&refs));
            }
            all.sort_unstable();
            let mut want = refs.clone();
            want.sort_unstable();
            assert_eq!(all, want, "{kind}");
        }
    }

    #[test]
    fn count_deals_the_sorted_list_round_robin() {
        let p: Partition = "count:1/2".parse().expect("valid");
        assert_eq!(p.select(&["d", "a", "c", "b"]), ["a", "c"]);
    }

    #[test]
    fn hash_is_stable() {
        assert_eq!(stable_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash("a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn filters_match_ids_exactly_or_by_regex() {
        let f: Filter = "disk".parse().expect("valid");
        assert!(f.matches("disk") && f.matches("cow-disk-1"));
        let f: Filter = "^fix.*$".parse().expect("valid");
        assert!(f.matches("fixtures") && !f.matches("a-fixtures"));
        assert!("(".parse::<Filter>().is_err());
    }
}
