//! Pages of list calls (AIP-158). A page token names the list and the key
//! of the last item sent, so the next page starts after it however the
//! list changed in between, and a token from one list is refused by
//! another. Tokens are hex so that clients treat them as opaque.

use std::fmt::Display;
use std::str::FromStr;

use crate::error::CoordinatorError;

/// Items in a page when the caller does not say.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// The most items in a page, whatever the caller asks.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Where a page starts and how long it is.
#[derive(Debug)]
pub struct PageRequest<K> {
    /// Items in the page.
    pub size: usize,
    /// The key of the last item of the previous page.
    pub after: Option<K>,
    list: &'static str,
}

impl<K: FromStr + Display> PageRequest<K> {
    /// Reads `page_size` and `page_token` for the list named `list`.
    pub fn new(
        list: &'static str,
        page_size: i32,
        page_token: &str,
    ) -> Result<Self, CoordinatorError> {
        let size = match page_size {
            n if n < 0 => {
                return Err(CoordinatorError::InvalidArgument(format!(
                    "page_size: {n} is negative"
                )))
            }
            0 => DEFAULT_PAGE_SIZE,
            n => (n as usize).min(MAX_PAGE_SIZE),
        };
        let after = if page_token.is_empty() {
            None
        } else {
            Some(decode(list, page_token).ok_or_else(|| {
                CoordinatorError::InvalidArgument(format!(
                    "page_token: not a token of this list ({list})"
                ))
            })?)
        };
        Ok(Self { size, after, list })
    }

    /// The page from `items` (in key order, already past `after`), and the
    /// token of the next page: empty when nothing is left.
    pub fn take<T>(&self, items: impl Iterator<Item = (K, T)>) -> (Vec<T>, String) {
        let mut page = Vec::with_capacity(self.size.min(64));
        let mut last = None;
        let mut more = false;
        for (key, item) in items {
            if page.len() == self.size {
                more = true;
                break;
            }
            page.push(item);
            last = Some(key);
        }
        let token = match (more, last) {
            (true, Some(k)) => encode(self.list, &k),
            _ => String::new(),
        };
        (page, token)
    }
}

fn encode(list: &str, key: &impl Display) -> String {
    format!("{list}:{key}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode<K: FromStr>(list: &str, token: &str) -> Option<K> {
    if !token.len().is_multiple_of(2) || token.len() > 1024 {
        return None;
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let text = String::from_utf8(bytes).ok()?;
    let (name, key) = text.split_once(':')?;
    (name == list).then(|| key.parse().ok())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_each_other_and_tokens_belong_to_their_list() {
        let items = || (1u64..=5).map(|k| (k, k * 10));
        let first = PageRequest::<u64>::new("jobs", 2, "").unwrap();
        let (page, token) = first.take(items());
        assert_eq!(page, vec![10, 20]);
        let second = PageRequest::<u64>::new("jobs", 2, &token).unwrap();
        assert_eq!(second.after, Some(2));
        let (page, token) = second.take(items().filter(|(k, _)| *k > 2));
        assert_eq!(page, vec![30, 40]);
        let last = PageRequest::<u64>::new("jobs", 2, &token).unwrap();
        let (page, token) = last.take(items().filter(|(k, _)| *k > 4));
        assert_eq!((page, token.as_str()), (vec![50], ""));
        assert!(PageRequest::<String>::new("nodes", 2, &encode("jobs", &"2")).is_err());
        assert!(PageRequest::<u64>::new("jobs", 2, "zz").is_err());
        assert!(PageRequest::<u64>::new("jobs", -1, "").is_err());
        assert_eq!(
            PageRequest::<u64>::new("jobs", 0, "").unwrap().size,
            DEFAULT_PAGE_SIZE
        );
        assert_eq!(
            PageRequest::<u64>::new("jobs", 5000, "").unwrap().size,
            MAX_PAGE_SIZE
        );
    }
}
