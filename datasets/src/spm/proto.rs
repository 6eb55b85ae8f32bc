//! sentencepiece's `ModelProto` (`tokenizer.model`), read and written without a protobuf
//! library: the pieces are decoded, every other field is kept as its original bytes, so a
//! model with pieces appended serialises exactly as sentencepiece's Python tooling writes it.
//!
//! Only what tokenisation needs is interpreted: each piece's text, score and type, the model
//! type and byte fallback (`trainer_spec` fields 3 and 35), and the normaliser's name,
//! `add_dummy_prefix`, `remove_extra_whitespaces` and `escape_whitespaces` (fields 1, 3–5).

use anyhow::{bail, Context, Result};

/// `ModelProto.SentencePiece.Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceType {
    Normal = 1,
    Unknown = 2,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
    Byte = 6,
}

impl PieceType {
    fn from_i64(v: i64) -> Result<Self> {
        Ok(match v {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            other => bail!("unknown sentencepiece piece type {other}"),
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    pub piece: String,
    pub score: f32,
    pub kind: PieceType,
    /// The piece's message as read (re-emitted unchanged); `None` for added pieces.
    raw: Option<Vec<u8>>,
}

impl Piece {
    /// A piece as Colossal-LLaMA's `init_tokenizer.py` appends it: `SentencePiece(piece=…,
    /// score=0)`, type left at its default.
    pub fn added(piece: &str) -> Self {
        Self {
            piece: piece.to_string(),
            score: 0.0,
            kind: PieceType::Normal,
            raw: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ModelProto {
    pub pieces: Vec<Piece>,
    /// Top-level fields other than pieces, as (field number, whole encoded field).
    others: Vec<(u64, Vec<u8>)>,
    pub bpe: bool,
    pub byte_fallback: bool,
    pub normalizer_name: String,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).context("truncated varint")?;
            self.pos += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        bail!("varint longer than 10 bytes")
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.context("field runs past the end of the message")?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// Next field: (number, wire type, payload: varint value or bytes).
    fn field(&mut self) -> Result<(u64, Value<'a>)> {
        let key = self.varint()?;
        let (num, wire) = (key >> 3, key & 7);
        let v = match wire {
            0 => Value::Varint(self.varint()?),
            1 => Value::Bytes(self.take(8)?),
            2 => {
                let n = self.varint()? as usize;
                Value::Bytes(self.take(n)?)
            }
            5 => Value::Bytes(self.take(4)?),
            w => bail!("unsupported protobuf wire type {w} (field {num})"),
        };
        Ok((num, v))
    }
}

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn parse_piece(msg: &[u8]) -> Result<Piece> {
    let mut r = Reader { buf: msg, pos: 0 };
    let (mut piece, mut score, mut kind) = (String::new(), 0f32, PieceType::Normal);
    while !r.done() {
        match r.field()? {
            (1, Value::Bytes(b)) => {
                piece = String::from_utf8(b.to_vec()).context("piece is not UTF-8")?
            }
            (2, Value::Bytes(b)) if b.len() == 4 => score = f32::from_le_bytes(b.try_into()?),
            (3, Value::Varint(v)) => kind = PieceType::from_i64(v as i64)?,
            _ => {}
        }
    }
    Ok(Piece {
        piece,
        score,
        kind,
        raw: Some(msg.to_vec()),
    })
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, field << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

impl ModelProto {
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader { buf: bytes, pos: 0 };
        let mut m = ModelProto {
            pieces: Vec::new(),
            others: Vec::new(),
            bpe: false,
            byte_fallback: false,
            normalizer_name: String::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        };
        while !r.done() {
            let start = r.pos;
            let (num, value) = r.field()?;
            match (num, value) {
                (1, Value::Bytes(b)) => m.pieces.push(parse_piece(b)?),
                (num, value) => {
                    if let (2, Value::Bytes(b)) = (num, &value) {
                        m.read_trainer_spec(b)?;
                    }
                    if let (3, Value::Bytes(b)) = (num, &value) {
                        m.read_normalizer_spec(b)?;
                    }
                    m.others.push((num, bytes[start..r.pos].to_vec()));
                }
            }
        }
        Ok(m)
    }

    fn read_trainer_spec(&mut self, msg: &[u8]) -> Result<()> {
        let mut r = Reader { buf: msg, pos: 0 };
        while !r.done() {
            match r.field()? {
                (3, Value::Varint(v)) => self.bpe = v == 2,
                (35, Value::Varint(v)) => self.byte_fallback = v != 0,
                _ => {}
            }
        }
        Ok(())
    }

    fn read_normalizer_spec(&mut self, msg: &[u8]) -> Result<()> {
        let mut r = Reader { buf: msg, pos: 0 };
        while !r.done() {
            match r.field()? {
                (1, Value::Bytes(b)) => self.normalizer_name = String::from_utf8_lossy(b).into(),
                (3, Value::Varint(v)) => self.add_dummy_prefix = v != 0,
                (4, Value::Varint(v)) => self.remove_extra_whitespaces = v != 0,
                (5, Value::Varint(v)) => self.escape_whitespaces = v != 0,
                _ => {}
            }
        }
        Ok(())
    }

    /// Serialises in field-number order, as protobuf does: pieces, then the other fields.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for p in &self.pieces {
            let msg = match &p.raw {
                Some(raw) => raw.clone(),
                None => {
                    let mut m = Vec::new();
                    put_bytes(&mut m, 1, p.piece.as_bytes());
                    put_varint(&mut m, 2 << 3 | 5);
                    m.extend_from_slice(&p.score.to_le_bytes());
                    if p.kind != PieceType::Normal {
                        put_varint(&mut m, 3 << 3);
                        put_varint(&mut m, p.kind as u64);
                    }
                    m
                }
            };
            put_bytes(&mut out, 1, &msg);
        }
        let mut others = self.others.clone();
        others.sort_by_key(|(num, _)| *num);
        for (_, raw) in others {
            out.extend_from_slice(&raw);
        }
        out
    }

    pub fn load(path: &std::path::Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        Self::parse(&bytes)
            .with_context(|| format!("{}: not a sentencepiece model", path.display()))
    }
}
