//! `indexer`: an inverted index from words to the documents containing them.

use std::collections::HashSet;

use crate::mr::app::{App, AppError, Combiner, Emitter, Values};
use crate::mr::hash::FastBuildHasher;

use super::wc::for_each_word;

/// Inverted index: the output line of a word is `word N doc1,doc2,…` with the N distinct
/// documents (input paths) containing it, sorted, as the reference lab's `indexer`.
///
/// Values are sets of documents, encoded as a sequence of (u32 little-endian length, name).
/// Map emits each word of a chunk once with a one-document set; the combiner and reduce take
/// unions, so a document split into several map tasks is still counted once.
#[derive(Clone, Copy, Debug, Default)]
pub struct Indexer;

fn encode_documents<'a>(documents: impl IntoIterator<Item = &'a [u8]>, out: &mut Vec<u8>) {
    for document in documents {
        let len = u32::try_from(document.len()).expect("document name over 4 GiB");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(document);
    }
}

fn decode_documents(mut value: &[u8], out: &mut Vec<Vec<u8>>) -> Result<(), AppError> {
    while !value.is_empty() {
        let malformed = || AppError::new("indexer: malformed document set");
        let len_bytes: [u8; 4] = value
            .get(..4)
            .ok_or_else(malformed)?
            .try_into()
            .expect("4 bytes");
        let len = u32::from_le_bytes(len_bytes) as usize;
        let document = value.get(4..4 + len).ok_or_else(malformed)?;
        out.push(document.to_vec());
        value = &value[4 + len..];
    }
    Ok(())
}

impl App for Indexer {
    fn name(&self) -> &str {
        "indexer"
    }

    fn map(&self, filename: &str, contents: &[u8], emit: &mut Emitter<'_>) -> Result<(), AppError> {
        let mut seen: HashSet<&[u8], FastBuildHasher> = HashSet::default();
        for_each_word(contents, |word| {
            seen.insert(word);
        });
        let mut document = Vec::new();
        encode_documents([filename.as_bytes()], &mut document);
        for word in seen {
            emit.emit(word, &document);
        }
        Ok(())
    }

    fn reduce(
        &self,
        _key: &[u8],
        values: &mut Values<'_>,
        output: &mut Vec<u8>,
    ) -> Result<(), AppError> {
        let mut documents = Vec::new();
        while let Some(value) = values.next_value() {
            decode_documents(value, &mut documents)?;
        }
        documents.sort();
        documents.dedup();
        output.extend_from_slice(documents.len().to_string().as_bytes());
        output.push(b' ');
        for (i, document) in documents.iter().enumerate() {
            if i > 0 {
                output.push(b',');
            }
            output.extend_from_slice(document);
        }
        Ok(())
    }

    fn combiner(&self) -> Option<&dyn Combiner> {
        Some(self)
    }
}

impl Combiner for Indexer {
    fn combine(
        &self,
        _key: &[u8],
        accumulator: &mut Vec<u8>,
        value: &[u8],
    ) -> Result<(), AppError> {
        if accumulator.as_slice() == value {
            return Ok(());
        }
        let mut documents = Vec::new();
        decode_documents(accumulator, &mut documents)?;
        decode_documents(value, &mut documents)?;
        documents.sort();
        documents.dedup();
        accumulator.clear();
        encode_documents(documents.iter().map(Vec::as_slice), accumulator);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves combining is a union and reduce prints the count and the sorted distinct names.
    #[test]
    fn combine_and_reduce_take_unions() {
        let mut a = Vec::new();
        encode_documents([&b"b.txt"[..]], &mut a);
        let mut b = Vec::new();
        encode_documents([&b"a.txt"[..], b"b.txt"], &mut b);
        Indexer.combine(b"w", &mut a, &b).unwrap();
        let values = [a, b];
        let mut source = values.iter();
        let mut output = Vec::new();
        Indexer
            .reduce(b"w", &mut Values::new(&mut source), &mut output)
            .unwrap();
        assert_eq!(output, b"2 a.txt,b.txt");
    }

    // Proves a malformed document set is an error, not a panic.
    #[test]
    fn malformed_values_are_errors() {
        let values = [vec![9u8, 0, 0, 0, b'x']];
        let mut source = values.iter();
        let mut output = Vec::new();
        assert!(
            Indexer
                .reduce(b"w", &mut Values::new(&mut source), &mut output)
                .is_err()
        );
        let mut accumulator = vec![1, 2];
        assert!(
            Indexer
                .combine(b"w", &mut accumulator, &[0, 0, 0, 0])
                .is_err()
        );
    }
}
