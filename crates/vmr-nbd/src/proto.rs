//! NBD wire constants and fixed-size header encoding/decoding (pure functions, no I/O).
//!
//! Owns the byte layouts of the handshake option request/reply headers, the transmission request
//! header, the simple reply and the structured reply chunk header, plus the payload parsers for the
//! structured reply chunk types this client understands. Every parser checks lengths before it
//! reads, so malformed server data yields a [`ProtocolFault`], never a panic.

use crate::error::ProtocolFault;

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation magic (also prefixes every client option).
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Old-style negotiation magic (not supported).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flag: server supports fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: server supports omitting the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option: abort negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: enter transmission with info replies.
pub const OPT_GO: u32 = 7;
/// Option: negotiate structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: select meta contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: acknowledged.
pub const REP_ACK: u32 = 1;
/// Option reply: information item (`NBD_OPT_GO`/`NBD_OPT_INFO`).
pub const REP_INFO: u32 = 3;
/// Option reply: one selected meta context.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit set in every option error reply type.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option error: unsupported option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;

/// Info type: export size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: flags field is valid.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: write zeroes must allocate (no hole).
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Structured reply flag: last chunk of this reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: no payload (final chunk only).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: a hole (reads as zeros) at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: block status descriptors for one meta context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: error with message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// Chunk type: error with message and offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// Longest string (error message, context name) accepted from a server.
pub const MAX_STRING: usize = 4096;
/// Length of a request header on the wire.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header (after none of the payload).
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

/// Printable name of a command type, for errors.
pub fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_DISC => "disconnect",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_WRITE_ZEROES => "write_zeroes",
        CMD_BLOCK_STATUS => "block_status",
        _ => "unknown",
    }
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`CMD_*`).
    pub cmd: u16,
    /// Cookie echoed by the server.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl Request {
    /// Encode into the 28-byte wire form.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.cmd.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decode the 28-byte wire form (used by tests and fake servers).
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Self, String> {
        let magic = be32(&b[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(format!("bad request magic {magic:#x}"));
        }
        Ok(Self {
            flags: be16(&b[4..6]),
            cmd: be16(&b[6..8]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            length: be32(&b[24..28]),
        })
    }
}

/// The 16-byte simple reply header (after the magic has been checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// Error number (0 = success).
    pub error: u32,
    /// Cookie of the request.
    pub cookie: u64,
}

impl SimpleReply {
    /// Decode the 12 bytes that follow the simple reply magic.
    pub fn decode_rest(b: &[u8; 12]) -> Self {
        Self {
            error: be32(&b[0..4]),
            cookie: be64(&b[4..12]),
        }
    }

    /// Encode the full 16-byte form (used by tests and fake servers).
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b
    }
}

/// A structured reply chunk header (after the magic has been checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Chunk flags (`REPLY_FLAG_*`).
    pub flags: u16,
    /// Chunk type (`REPLY_TYPE_*`).
    pub kind: u16,
    /// Cookie of the request.
    pub cookie: u64,
    /// Payload length that follows.
    pub length: u32,
}

impl ChunkHeader {
    /// Decode the 16 bytes that follow the structured reply magic.
    pub fn decode_rest(b: &[u8; 16]) -> Self {
        Self {
            flags: be16(&b[0..2]),
            kind: be16(&b[2..4]),
            cookie: be64(&b[4..12]),
            length: be32(&b[12..16]),
        }
    }

    /// Encode the full 20-byte form (used by tests and fake servers).
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut b = [0u8; CHUNK_HEADER_LEN];
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// True when this is the final chunk of its reply.
    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// Parsed `NBD_REPLY_TYPE_ERROR` / `NBD_REPLY_TYPE_ERROR_OFFSET` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    /// Error number (never 0).
    pub errno: u32,
    /// Human-readable message (lossy UTF-8).
    pub message: String,
    /// Offset, for `ERROR_OFFSET`.
    pub offset: Option<u64>,
}

/// Parse an error chunk payload; `with_offset` for `ERROR_OFFSET`.
pub fn parse_error_chunk(p: &[u8], with_offset: bool) -> Result<ErrorChunk, ProtocolFault> {
    if p.len() < 6 {
        return Err(ProtocolFault::ErrorChunkShort(p.len()));
    }
    let errno = be32(&p[0..4]);
    let msg_len = usize::from(be16(&p[4..6]));
    if msg_len > MAX_STRING {
        return Err(ProtocolFault::ErrorMessageTooLong {
            len: msg_len,
            max: MAX_STRING,
        });
    }
    let tail = if with_offset { 8 } else { 0 };
    if p.len() != 6 + msg_len + tail {
        return Err(ProtocolFault::ErrorChunkLength {
            len: p.len(),
            message_len: msg_len,
        });
    }
    if errno == 0 {
        return Err(ProtocolFault::ErrorNumberZero);
    }
    let message = String::from_utf8_lossy(&p[6..6 + msg_len]).into_owned();
    let offset = with_offset.then(|| be64(&p[6 + msg_len..6 + msg_len + 8]));
    Ok(ErrorChunk {
        errno,
        message,
        offset,
    })
}

/// Parse a block status chunk payload into `(context id, [(length, flags)])`.
pub fn parse_block_status(p: &[u8]) -> Result<(u32, Vec<(u32, u32)>), ProtocolFault> {
    if p.len() < 12 || !(p.len() - 4).is_multiple_of(8) {
        return Err(ProtocolFault::StatusChunkLength(p.len()));
    }
    let id = be32(&p[0..4]);
    let descs = p[4..]
        .chunks_exact(8)
        .map(|d| (be32(&d[0..4]), be32(&d[4..8])))
        .collect();
    Ok((id, descs))
}

/// Big-endian u16 from a 2-byte slice (caller guarantees the length).
pub fn be16(b: &[u8]) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[..2]);
    u16::from_be_bytes(a)
}

/// Big-endian u32 from a 4-byte slice (caller guarantees the length).
pub fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

/// Big-endian u64 from an 8-byte slice (caller guarantees the length).
pub fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_layout() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            cmd: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 0x1000,
            length: 512,
        };
        let b = r.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..6], &[0, 1]);
        assert_eq!(&b[6..8], &[0, 1]);
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[24..28], &[0, 0, 2, 0]);
        assert_eq!(Request::decode(&b), Ok(r));
        let mut bad = b;
        bad[0] = 0;
        assert!(Request::decode(&bad).is_err());
    }

    #[test]
    fn reply_headers_round_trip() {
        let s = SimpleReply {
            error: 22,
            cookie: 9,
        };
        let b = s.encode();
        assert_eq!(&b[0..4], &[0x67, 0x44, 0x66, 0x98]);
        let mut rest = [0u8; 12];
        rest.copy_from_slice(&b[4..]);
        assert_eq!(SimpleReply::decode_rest(&rest), s);

        let c = ChunkHeader {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_BLOCK_STATUS,
            cookie: 77,
            length: 12,
        };
        let b = c.encode();
        assert_eq!(&b[0..4], &[0x66, 0x8e, 0x33, 0xef]);
        let mut rest = [0u8; 16];
        rest.copy_from_slice(&b[4..]);
        let d = ChunkHeader::decode_rest(&rest);
        assert_eq!(d, c);
        assert!(d.done());
    }

    #[test]
    fn error_chunk_parsing() {
        let mut p = vec![0, 0, 0, 5, 0, 3];
        p.extend_from_slice(b"bad");
        let e = parse_error_chunk(&p, false).unwrap();
        assert_eq!(e.errno, 5);
        assert_eq!(e.message, "bad");
        assert_eq!(e.offset, None);
        // Offset variant.
        let mut q = p.clone();
        q.extend_from_slice(&7u64.to_be_bytes());
        assert_eq!(parse_error_chunk(&q, true).unwrap().offset, Some(7));
        // Message length claims more than present.
        let mut short = p.clone();
        short[5] = 200;
        assert!(parse_error_chunk(&short, false).is_err());
        // Trailing garbage.
        let mut long = p.clone();
        long.push(0);
        assert!(parse_error_chunk(&long, false).is_err());
        // Too short for the fixed part.
        assert!(parse_error_chunk(&[0, 0, 0], false).is_err());
        // errno 0 is invalid.
        assert!(parse_error_chunk(&[0, 0, 0, 0, 0, 0], false).is_err());
        // Message longer than the cap.
        let mut huge = vec![0, 0, 0, 5, 0xff, 0xff];
        huge.resize(6 + 0xffff, b'x');
        assert!(parse_error_chunk(&huge, false).is_err());
    }

    #[test]
    fn block_status_parsing() {
        let mut p = 3u32.to_be_bytes().to_vec();
        p.extend_from_slice(&4096u32.to_be_bytes());
        p.extend_from_slice(&1u32.to_be_bytes());
        p.extend_from_slice(&8192u32.to_be_bytes());
        p.extend_from_slice(&0u32.to_be_bytes());
        let (id, d) = parse_block_status(&p).unwrap();
        assert_eq!(id, 3);
        assert_eq!(d, vec![(4096, 1), (8192, 0)]);
        assert!(parse_block_status(&p[..4]).is_err());
        assert!(parse_block_status(&p[..13]).is_err());
        assert!(parse_block_status(&[]).is_err());
    }
}
