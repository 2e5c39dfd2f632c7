//! Case-insensitive operations on an ordered header list.
//!
//! The contract keeps headers as a list of `(name, value)` pairs in arrival
//! order, with names as received and repeats kept (`Set-Cookie`, `Via`).
//! HTTP header names are case-insensitive, so every lookup here compares
//! names with ASCII case folding. [`Invocation`](crate::Invocation) and
//! [`Reply`](crate::Reply) expose these as methods; use the trait directly
//! for other lists of the same shape.

/// Header operations on the contract's `list<tuple<string, string>>`.
pub trait HeaderList {
    /// The value of the first header named `name` (any case).
    fn get_header(&self, name: &str) -> Option<&str>;

    /// Every value of the headers named `name` (any case), in order.
    fn get_all_headers<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a;

    /// Replaces every header named `name` with one `name: value`, kept at
    /// the position of the first one it replaces (or appended when none
    /// existed), so that header order is disturbed as little as possible.
    fn set_header(&mut self, name: &str, value: &str);

    /// Appends `name: value`, keeping any existing headers of that name.
    fn append_header(&mut self, name: &str, value: &str);

    /// Removes every header named `name` (any case); returns how many went.
    fn remove_header(&mut self, name: &str) -> usize;
}

impl HeaderList for Vec<(String, String)> {
    fn get_header(&self, name: &str) -> Option<&str> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn get_all_headers<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn set_header(&mut self, name: &str, value: &str) {
        match self.iter().position(|(n, _)| n.eq_ignore_ascii_case(name)) {
            Some(first) => {
                self[first] = (name.to_owned(), value.to_owned());
                let mut index = 0;
                self.retain(|(n, _)| {
                    let keep = index <= first || !n.eq_ignore_ascii_case(name);
                    index += 1;
                    keep
                });
            }
            None => self.append_header(name, value),
        }
    }

    fn append_header(&mut self, name: &str, value: &str) {
        self.push((name.to_owned(), value.to_owned()));
    }

    fn remove_header(&mut self, name: &str) -> usize {
        let before = self.len();
        self.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        before - self.len()
    }
}

#[cfg(test)]
mod tests {
    use super::HeaderList;

    fn list(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn get_ignores_case_and_returns_the_first() {
        let h = list(&[("content-type", "text/plain"), ("X-A", "1"), ("x-a", "2")]);
        assert_eq!(h.get_header("Content-Type"), Some("text/plain"));
        assert_eq!(h.get_header("X-A"), Some("1"));
        assert_eq!(h.get_all_headers("X-a").collect::<Vec<_>>(), ["1", "2"]);
        assert_eq!(h.get_header("missing"), None);
    }

    #[test]
    fn set_replaces_all_in_place_of_the_first() {
        let mut h = list(&[("A", "1"), ("x-k", "old1"), ("B", "2"), ("X-K", "old2")]);
        h.set_header("X-K", "new");
        assert_eq!(h, list(&[("A", "1"), ("X-K", "new"), ("B", "2")]));
        h.set_header("C", "3");
        assert_eq!(h.last(), Some(&("C".to_owned(), "3".to_owned())));
    }

    #[test]
    fn remove_counts_every_match() {
        let mut h = list(&[("A", "1"), ("a", "2"), ("B", "3")]);
        assert_eq!(h.remove_header("A"), 2);
        assert_eq!(h, list(&[("B", "3")]));
        assert_eq!(h.remove_header("A"), 0);
    }
}
