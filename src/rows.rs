//! A set of rows, (input index, row number), kept as one bitset per input:
//! the rows done of a ten-million-row run take 1.2 MB, in whatever order
//! they were done.

/// Rows, by input and 1-based row number.
#[derive(Debug, Default, Clone)]
pub struct RowSet {
    /// One bit per row number, one bitset per input.
    inputs: Vec<Vec<u64>>,
    len: u64,
}

impl RowSet {
    /// Adds a row; false if it was there already.
    pub fn insert(&mut self, input: usize, row: u64) -> bool {
        if self.inputs.len() <= input {
            self.inputs.resize_with(input + 1, Vec::new);
        }
        let words = &mut self.inputs[input];
        let (word, bit) = ((row / 64) as usize, 1u64 << (row % 64));
        if words.len() <= word {
            words.resize(word + 1, 0);
        }
        let new = words[word] & bit == 0;
        words[word] |= bit;
        self.len += u64::from(new);
        new
    }

    /// Takes a row out; false if it was not there.
    pub fn remove(&mut self, input: usize, row: u64) -> bool {
        let Some(word) = self.inputs.get_mut(input).and_then(|words| words.get_mut((row / 64) as usize)) else {
            return false;
        };
        let bit = 1u64 << (row % 64);
        let was = *word & bit != 0;
        *word &= !bit;
        self.len -= u64::from(was);
        was
    }

    pub fn contains(&self, input: usize, row: u64) -> bool {
        let word = self.inputs.get(input).and_then(|words| words.get((row / 64) as usize));
        word.is_some_and(|w| w & (1u64 << (row % 64)) != 0)
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The rows in this set and not in `other`, in order.
    pub fn difference<'a>(&'a self, other: &'a RowSet) -> impl Iterator<Item = (usize, u64)> + 'a {
        self.inputs.iter().enumerate().flat_map(move |(input, words)| {
            words.iter().enumerate().flat_map(move |(at, &word)| {
                let theirs = other.inputs.get(input).and_then(|w| w.get(at)).copied().unwrap_or(0);
                let left = word & !theirs;
                (0..64u64).filter(move |bit| left & (1 << bit) != 0).map(move |bit| (input, at as u64 * 64 + bit))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_rows_of_several_inputs_apart() {
        let mut set = RowSet::default();
        assert!(set.insert(0, 7));
        assert!(set.insert(2, 7));
        assert!(!set.insert(2, 7), "already there");
        assert!(set.insert(1, 10_000_000));
        assert_eq!(set.len(), 3);
        assert!(set.contains(0, 7) && set.contains(2, 7) && set.contains(1, 10_000_000));
        assert!(!set.contains(1, 7) && !set.contains(3, 7) && !set.contains(0, 8));
    }

    #[test]
    fn difference_is_exact_on_input_and_row() {
        let (mut started, mut done) = (RowSet::default(), RowSet::default());
        for (input, row) in [(0, 1), (0, 63), (0, 64), (1, 1), (1, 200)] {
            started.insert(input, row);
        }
        done.insert(0, 63);
        done.insert(1, 1);
        done.insert(5, 1);
        assert_eq!(started.difference(&done).collect::<Vec<_>>(), vec![(0, 1), (0, 64), (1, 200)]);
    }

    #[test]
    fn ten_million_rows_take_little_memory() {
        let mut set = RowSet::default();
        for row in (1..=10_000_000).rev() {
            set.insert(0, row);
        }
        assert_eq!(set.len(), 10_000_000);
        assert!(set.inputs[0].capacity() * 8 < 1_300_000 * 2, "about 1.2 MB");
    }
}
