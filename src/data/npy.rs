//! The NumPy `.npy` array format (versions 1.0, 2.0 and 3.0), as far as MedMNIST needs it.
//!
//! Follows the format specification
//! <https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html>: magic `\x93NUMPY`,
//! version, header length, a Python dict literal with `descr`, `fortran_order` and `shape`, then the
//! raw C-order data. Only plain numeric dtypes in C order are read; errors are phrases the caller
//! wraps with the file and key.
//!
//! This module knows nothing of zip archives or images.

use crate::{Error, Result};

/// Element type of a `.npy` array: kind (`u`, `i`, `f`, `b`, ...) and size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DType {
    pub(crate) kind: char,
    pub(crate) size: usize,
}

/// A parsed `.npy` array: C-order raw bytes.
#[derive(Debug)]
pub(crate) struct NpyArray {
    pub(crate) descr: String,
    pub(crate) dtype: DType,
    pub(crate) big_endian: bool,
    pub(crate) shape: Vec<usize>,
    pub(crate) data: Vec<u8>,
}

impl NpyArray {
    /// The elements as non-negative integer labels.
    pub(crate) fn integers(&self, name: &str, key: &str) -> Result<Vec<u32>> {
        let invalid = |reason: String| Error::InvalidDataset {
            source_name: name.into(),
            reason,
            hint: "labels must be non-negative integers (class indices)".into(),
        };
        let DType { kind, size } = self.dtype;
        if !matches!(kind, 'u' | 'i') || !matches!(size, 1 | 2 | 4 | 8) {
            return Err(invalid(format!(
                "`{key}` has dtype `{}`, expected an integer type",
                self.descr
            )));
        }
        let mut labels = Vec::with_capacity(self.data.len() / size);
        for (i, chunk) in self.data.chunks_exact(size).enumerate() {
            let mut bytes = [0u8; 8];
            if self.big_endian {
                bytes[8 - size..].copy_from_slice(chunk);
                bytes.reverse();
            } else {
                bytes[..size].copy_from_slice(chunk);
            }
            let raw = u64::from_le_bytes(bytes);
            // Sign-extend signed values so negatives are caught below.
            let value: i128 = if kind == 'i' {
                let shift = 64 - 8 * size as u32;
                i128::from(((raw << shift) as i64) >> shift)
            } else {
                i128::from(raw)
            };
            let label = u32::try_from(value)
                .ok()
                .filter(|&l| l < u32::MAX)
                .ok_or_else(|| invalid(format!("`{key}`[{i}] is {value}, not a class index")))?;
            labels.push(label);
        }
        Ok(labels)
    }
}

/// Parses a `.npy` file (format 1.0, 2.0 or 3.0). Errors are phrases for [`Error::InvalidDataset`].
pub(crate) fn parse_npy(bytes: &[u8]) -> std::result::Result<NpyArray, String> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if !bytes.starts_with(MAGIC) || bytes.len() < 10 {
        return Err("missing the `\\x93NUMPY` magic".into());
    }
    let major = bytes[6];
    let (header_len, header_start): (usize, usize) = match major {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated header".into());
            }
            let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            (len as usize, 12)
        }
        v => return Err(format!("format version {v} is not supported (1, 2 or 3)")),
    };
    let header_end = header_start
        .checked_add(header_len)
        .filter(|&end| end <= bytes.len())
        .ok_or("truncated header")?;
    let header =
        std::str::from_utf8(&bytes[header_start..header_end]).map_err(|_| "header is not text")?;
    let dict = parse_header(header)?;

    let descr = match dict.get("descr") {
        Some(PyValue::Str(s)) => s.clone(),
        Some(_) => return Err("structured dtypes are not supported".into()),
        None => return Err("header has no `descr`".into()),
    };
    match dict.get("fortran_order") {
        Some(PyValue::Bool(false)) => {}
        Some(PyValue::Bool(true)) => {
            return Err(
                "`fortran_order` is True; only C-order arrays are supported \
                        (save `numpy.ascontiguousarray(a)`)"
                    .into(),
            )
        }
        _ => return Err("header has no boolean `fortran_order`".into()),
    }
    let shape = match dict.get("shape") {
        Some(PyValue::Tuple(shape)) => shape.clone(),
        _ => return Err("header has no `shape` tuple".into()),
    };
    let (dtype, big_endian) = parse_descr(&descr)?;
    let expected = shape
        .iter()
        .try_fold(dtype.size, |acc, &d| acc.checked_mul(d))
        .ok_or("shape is too large")?;
    let data = &bytes[header_end..];
    if data.len() != expected {
        return Err(format!(
            "shape {shape:?} of `{descr}` needs {expected} data bytes, found {}",
            data.len()
        ));
    }
    Ok(NpyArray {
        descr,
        dtype,
        big_endian,
        shape,
        data: data.to_vec(),
    })
}

/// Parses a dtype string such as `|u1` or `<i8` into its type and byte order.
fn parse_descr(descr: &str) -> std::result::Result<(DType, bool), String> {
    let mut chars = descr.chars();
    let (big_endian, rest) = match chars.next() {
        Some('<' | '|' | '=') => (false, chars.as_str()),
        Some('>') => (true, chars.as_str()),
        _ => (false, descr),
    };
    let mut rest_chars = rest.chars();
    let kind = rest_chars
        .next()
        .ok_or_else(|| format!("empty dtype `{descr}`"))?;
    let size: usize = rest_chars
        .as_str()
        .parse()
        .map_err(|_| format!("unsupported dtype `{descr}`"))?;
    if size == 0 {
        return Err(format!("unsupported dtype `{descr}`"));
    }
    Ok((DType { kind, size }, big_endian))
}

/// A value of the `.npy` header dictionary.
#[derive(Debug, Clone, PartialEq)]
enum PyValue {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
    /// A list (structured dtype); its content is not needed.
    List,
}

/// Parses the Python dict literal of a `.npy` header, e.g.
/// `{'descr': '|u1', 'fortran_order': False, 'shape': (4000, 1), }`.
fn parse_header(
    text: &str,
) -> std::result::Result<std::collections::HashMap<String, PyValue>, String> {
    let mut parser = HeaderParser {
        chars: text.trim().chars().collect(),
        pos: 0,
    };
    parser.expect('{')?;
    let mut dict = std::collections::HashMap::new();
    loop {
        parser.skip_space();
        if parser.eat('}') {
            break;
        }
        let key = parser.string()?;
        parser.skip_space();
        parser.expect(':')?;
        parser.skip_space();
        let value = parser.value()?;
        dict.insert(key, value);
        parser.skip_space();
        if parser.eat(',') {
            continue;
        }
        parser.skip_space();
        parser.expect('}')?;
        break;
    }
    Ok(dict)
}

struct HeaderParser {
    chars: Vec<char>,
    pos: usize,
}

impl HeaderParser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: char) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!(
                "malformed header: expected `{c}` at character {}",
                self.pos
            ))
        }
    }

    fn string(&mut self) -> std::result::Result<String, String> {
        let quote = match self.peek() {
            Some(q @ ('\'' | '"')) => q,
            _ => {
                return Err(format!(
                    "malformed header: expected a string at character {}",
                    self.pos
                ))
            }
        };
        self.pos += 1;
        let mut out = String::new();
        while let Some(c) = self.peek() {
            self.pos += 1;
            if c == quote {
                return Ok(out);
            }
            out.push(c);
        }
        Err("malformed header: unterminated string".into())
    }

    fn value(&mut self) -> std::result::Result<PyValue, String> {
        match self.peek() {
            Some('\'' | '"') => self.string().map(PyValue::Str),
            Some('(') => {
                self.pos += 1;
                let mut dims = Vec::new();
                loop {
                    self.skip_space();
                    if self.eat(')') {
                        break;
                    }
                    let start = self.pos;
                    while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                        self.pos += 1;
                    }
                    let digits: String = self.chars[start..self.pos].iter().collect();
                    let dim = digits.parse().map_err(|_| {
                        format!("malformed header: bad dimension at character {start}")
                    })?;
                    dims.push(dim);
                    self.eat('L');
                    self.skip_space();
                    if !self.eat(',') {
                        self.skip_space();
                        self.expect(')')?;
                        break;
                    }
                }
                Ok(PyValue::Tuple(dims))
            }
            Some('[') => {
                let mut depth = 0usize;
                while let Some(c) = self.peek() {
                    match c {
                        '\'' | '"' => {
                            self.string()?;
                            continue;
                        }
                        '[' | '(' => depth += 1,
                        ']' | ')' => depth -= 1,
                        _ => {}
                    }
                    self.pos += 1;
                    if depth == 0 {
                        return Ok(PyValue::List);
                    }
                }
                Err("malformed header: unterminated list".into())
            }
            _ => {
                let start = self.pos;
                while self.peek().is_some_and(char::is_alphabetic) {
                    self.pos += 1;
                }
                match self.chars[start..self.pos]
                    .iter()
                    .collect::<String>()
                    .as_str()
                {
                    "True" => Ok(PyValue::Bool(true)),
                    "False" => Ok(PyValue::Bool(false)),
                    _ => Err(format!(
                        "malformed header: unexpected value at character {start}"
                    )),
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A format 1.0 `.npy` file of `data` with dtype `descr` and shape `shape` (a Python tuple).
    pub(crate) fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend((header.len() as u16).to_le_bytes());
        bytes.extend(header.as_bytes());
        bytes.extend(data);
        bytes
    }

    #[test]
    fn header_parser_handles_versions_and_orders() {
        let array = parse_npy(&npy(">u2", "(2,)", &[0, 7, 1, 0])).unwrap();
        assert_eq!(array.shape, vec![2]);
        assert_eq!(array.integers("x", "k").unwrap(), vec![7, 256]);

        let mut v2 = npy("<u2", "(1,)", &[5, 0]);
        // Rewrite as format 2.0: 4-byte header length.
        let len = u16::from_le_bytes([v2[8], v2[9]]) as u32;
        v2[6] = 2;
        v2.splice(8..10, len.to_le_bytes());
        assert_eq!(parse_npy(&v2).unwrap().integers("x", "k").unwrap(), vec![5]);

        let mut fortran = npy("|u1", "(1,)", &[0]);
        let at = fortran.windows(5).position(|w| w == b"False").unwrap();
        fortran[at..at + 5].copy_from_slice(b"True ");
        let err = parse_npy(&fortran).unwrap_err();
        assert!(err.contains("fortran_order"), "{err}");

        let short = npy("|u1", "(3,)", &[0]);
        assert!(parse_npy(&short)
            .unwrap_err()
            .contains("needs 3 data bytes"));
    }

    #[test]
    fn header_dict_parses_python_literals() {
        let dict = parse_header("{'descr': '<u1', 'fortran_order': False, 'shape': (), }").unwrap();
        assert_eq!(dict["shape"], PyValue::Tuple(vec![]));
        let dict = parse_header("{\"shape\": (3,), 'descr': [('a', '<i4')]}").unwrap();
        assert_eq!(dict["shape"], PyValue::Tuple(vec![3]));
        assert_eq!(dict["descr"], PyValue::List);
    }
}
