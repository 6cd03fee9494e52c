//! `wc`: word count.

use std::io::Write;

use crate::mr::app::{App, AppError, CombineOp, Combiner, Emitter, Values};

/// Word count: the output line of a word is `word count`.
///
/// Words are maximal runs of ASCII letters (see [`for_each_word`]); case is kept. Values
/// between map, combiner and reduce are counts as 8-byte little-endian integers, so combining
/// is one addition; the output is decimal.
#[derive(Clone, Copy, Debug, Default)]
pub struct WordCount;

const ONE: [u8; 8] = 1u64.to_le_bytes();

/// Calls `f` on every word of `text`: every maximal run of ASCII letters `[A-Za-z]+`. Any
/// other byte, including those of non-ASCII UTF-8 characters, separates words.
#[inline]
pub fn for_each_word<'a>(text: &'a [u8], mut f: impl FnMut(&'a [u8])) {
    let mut i = 0;
    let n = text.len();
    while i < n {
        while i < n && !text[i].is_ascii_alphabetic() {
            i += 1;
        }
        let start = i;
        while i < n && text[i].is_ascii_alphabetic() {
            i += 1;
        }
        if i > start {
            f(&text[start..i]);
        }
    }
}

fn decode_count(value: &[u8]) -> Result<u64, AppError> {
    let bytes: [u8; 8] = value.try_into().map_err(|_| {
        AppError::new(format!(
            "wc: a count must be 8 bytes, got {} bytes",
            value.len()
        ))
    })?;
    Ok(u64::from_le_bytes(bytes))
}

impl App for WordCount {
    fn name(&self) -> &str {
        "wc"
    }

    fn map(
        &self,
        _filename: &str,
        contents: &[u8],
        emit: &mut Emitter<'_>,
    ) -> Result<(), AppError> {
        for_each_word(contents, |word| emit.emit(word, &ONE));
        Ok(())
    }

    fn reduce(
        &self,
        _key: &[u8],
        values: &mut Values<'_>,
        output: &mut Vec<u8>,
    ) -> Result<(), AppError> {
        let mut total: u64 = 0;
        while let Some(value) = values.next_value() {
            total = total
                .checked_add(decode_count(value)?)
                .ok_or_else(|| AppError::new("wc: count overflows u64"))?;
        }
        write!(output, "{total}").expect("writing to a Vec cannot fail");
        Ok(())
    }

    fn combiner(&self) -> Option<&dyn Combiner> {
        Some(self)
    }
}

impl Combiner for WordCount {
    #[inline]
    fn combine(
        &self,
        _key: &[u8],
        accumulator: &mut Vec<u8>,
        value: &[u8],
    ) -> Result<(), AppError> {
        let total = decode_count(accumulator)?
            .checked_add(decode_count(value)?)
            .ok_or_else(|| AppError::new("wc: count overflows u64"))?;
        accumulator.copy_from_slice(&total.to_le_bytes());
        Ok(())
    }

    fn op(&self) -> Option<CombineOp> {
        Some(CombineOp::SumU64Le)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn words(text: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for_each_word(text, |w| out.push(w.to_vec()));
        out
    }

    // Proves the word rule on the edge cases: separators, digits, apostrophes, non-ASCII.
    #[test]
    fn words_are_runs_of_ascii_letters() {
        assert_eq!(words(b""), Vec::<Vec<u8>>::new());
        assert_eq!(
            words(b"  Hello, world!! "),
            vec![b"Hello".to_vec(), b"world".to_vec()]
        );
        assert_eq!(
            words(b"don't x1y"),
            vec![b"don".to_vec(), b"t".to_vec(), b"x".to_vec(), b"y".to_vec()]
        );
        assert_eq!(words("café".as_bytes()), vec![b"caf".to_vec()]);
        assert_eq!(words(b"end"), vec![b"end".to_vec()]);
    }

    proptest! {
        // Proves for_each_word agrees with a split-on-non-letters reference on any bytes.
        #[test]
        fn words_match_split_reference(text in proptest::collection::vec(any::<u8>(), 0..200)) {
            let reference: Vec<Vec<u8>> = text
                .split(|b| !b.is_ascii_alphabetic())
                .filter(|w| !w.is_empty())
                .map(<[u8]>::to_vec)
                .collect();
            prop_assert_eq!(words(&text), reference);
        }
    }

    // Proves reduce rejects a malformed value instead of panicking.
    #[test]
    fn reduce_rejects_malformed_counts() {
        let values = [vec![1u8, 2, 3]];
        let mut source = values.iter();
        let mut output = Vec::new();
        let result = WordCount.reduce(b"k", &mut Values::new(&mut source), &mut output);
        assert!(result.unwrap_err().message().contains("8 bytes"));
    }
}
