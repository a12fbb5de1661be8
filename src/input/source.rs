//! Opening an input file: a `.gz` or `.zst` file is decompressed as it is
//! read, never unpacked to disk; a legacy encoding is decoded to UTF-8; the
//! bytes read from the file itself are counted, for progress.

use std::cell::Cell;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::rc::Rc;

use super::{InputError, InputSpec};

/// How an input file is compressed, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn of(path: &Path) -> Compression {
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("gz" | "gzip") => Compression::Gzip,
            Some("zst" | "zstd") => Compression::Zstd,
            _ => Compression::None,
        }
    }
}

/// The text encoding of an input file (the job's `encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum Encoding {
    /// UTF-8, with or without a byte order mark. A file that starts with a
    /// UTF-16 byte order mark is read as UTF-16 all the same.
    #[default]
    Utf8,
    /// Excel's "CSV" on Western Windows systems.
    Windows1252,
    /// ISO-8859-1, read as Windows-1252 (its superset, as browsers do).
    Latin1,
    /// UTF-16 with a byte order mark (little-endian without one): Excel's
    /// "Unicode text".
    Utf16,
}

impl TryFrom<String> for Encoding {
    type Error = String;

    fn try_from(name: String) -> Result<Encoding, String> {
        match name.to_ascii_lowercase().replace('_', "-").as_str() {
            "utf-8" | "utf8" => Ok(Encoding::Utf8),
            "windows-1252" | "cp1252" => Ok(Encoding::Windows1252),
            "latin1" | "latin-1" | "iso-8859-1" => Ok(Encoding::Latin1),
            "utf-16" | "utf16" => Ok(Encoding::Utf16),
            _ => Err(format!("encoding `{name}` is not supported: utf-8, windows-1252, latin1 or utf-16")),
        }
    }
}

impl Encoding {
    fn decoder(self, first: &[u8]) -> Option<encoding_rs::Decoder> {
        let utf16_bom = first.starts_with(b"\xFF\xFE") || first.starts_with(b"\xFE\xFF");
        match self {
            Encoding::Utf8 if utf16_bom => Some(encoding_rs::UTF_16LE.new_decoder()),
            Encoding::Utf8 => None,
            Encoding::Windows1252 | Encoding::Latin1 => Some(encoding_rs::WINDOWS_1252.new_decoder()),
            // Sniffs the byte order mark and drops it.
            Encoding::Utf16 => Some(encoding_rs::UTF_16LE.new_decoder()),
        }
    }
}

/// An input opened for reading, and the count of bytes read from the file.
pub(super) struct Opened {
    pub reader: Box<dyn Read>,
    pub file_bytes: Rc<Cell<u64>>,
    /// The parser's byte position is the file's: neither decompressed nor
    /// decoded. The file's own count runs ahead of it by the read-ahead.
    pub exact: bool,
}

pub(super) fn open(spec: &InputSpec) -> Result<Opened, InputError> {
    let err = |source: std::io::Error| InputError::Open { path: spec.path.clone(), source };
    let file = File::open(&spec.path).map_err(err)?;
    let file_bytes = Rc::new(Cell::new(0));
    let counted = Counted { inner: file, count: file_bytes.clone() };
    let compression = Compression::of(&spec.path);
    let reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(counted),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(64 * 1024, counted))),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(counted).map_err(err)?),
    };
    // Look at the first bytes for a byte order mark, leaving them to be read.
    let mut buffered = BufReader::with_capacity(256 * 1024, reader);
    let first: Vec<u8> = buffered.fill_buf().map_err(err)?.iter().take(2).copied().collect();
    let decoder = spec.encoding.decoder(&first);
    let exact = decoder.is_none() && matches!(compression, Compression::None);
    let reader: Box<dyn Read> = match decoder {
        Some(decoder) => Box::new(Decode::new(buffered, decoder)),
        None => Box::new(buffered),
    };
    Ok(Opened { reader, file_bytes, exact })
}

struct Counted<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// Decodes a byte stream to UTF-8 as it is read.
struct Decode<R> {
    inner: R,
    decoder: encoding_rs::Decoder,
    input: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    output: Vec<u8>,
    out_start: usize,
    out_end: usize,
    done: bool,
}

impl<R: Read> Decode<R> {
    fn new(inner: R, decoder: encoding_rs::Decoder) -> Self {
        Decode {
            inner,
            decoder,
            input: vec![0; 64 * 1024],
            start: 0,
            end: 0,
            eof: false,
            output: vec![0; 3 * 64 * 1024 + 16],
            out_start: 0,
            out_end: 0,
            done: false,
        }
    }
}

impl<R: Read> Read for Decode<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if self.out_start < self.out_end {
                let n = buf.len().min(self.out_end - self.out_start);
                buf[..n].copy_from_slice(&self.output[self.out_start..self.out_start + n]);
                self.out_start += n;
                return Ok(n);
            }
            if self.done {
                return Ok(0);
            }
            if self.start == self.end && !self.eof {
                let n = self.inner.read(&mut self.input)?;
                (self.start, self.end, self.eof) = (0, n, n == 0);
            }
            let (result, read, written, _) =
                self.decoder.decode_to_utf8(&self.input[self.start..self.end], &mut self.output, self.eof);
            self.start += read;
            (self.out_start, self.out_end) = (0, written);
            if self.eof && result == encoding_rs::CoderResult::InputEmpty {
                self.done = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8], encoding: Encoding) -> String {
        let decoder = encoding.decoder(bytes).unwrap();
        let mut out = String::new();
        // One byte at a time from the file: characters split across reads.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let Some((&b, rest)) = self.0.split_first() else { return Ok(0) };
                buf[0] = b;
                self.0 = rest;
                Ok(1)
            }
        }
        Decode::new(Trickle(bytes), decoder).read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn legacy_encodings_decode_to_utf8() {
        assert_eq!(decode(b"name\nZo\xEB \x80 caf\xE9\n", Encoding::Windows1252), "name\nZoë € café\n");
        assert_eq!(decode(b"Zo\xEB", Encoding::Latin1), "Zoë");
        let utf16le: Vec<u8> =
            [0xFF, 0xFE].into_iter().chain("id,név\n1,Zoë\n".encode_utf16().flat_map(u16::to_le_bytes)).collect();
        assert_eq!(decode(&utf16le, Encoding::Utf16), "id,név\n1,Zoë\n");
        assert_eq!(decode(&utf16le, Encoding::Utf8), "id,név\n1,Zoë\n", "a UTF-16 byte order mark is seen anyway");
        let utf16be: Vec<u8> =
            [0xFE, 0xFF].into_iter().chain("a,b".encode_utf16().flat_map(u16::to_be_bytes)).collect();
        assert_eq!(decode(&utf16be, Encoding::Utf16), "a,b");
    }
}
