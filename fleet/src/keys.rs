//! Ed25519 signing keys of policy bundles, as hex text files.
//!
//! - The secret key file holds the hex of the 32-byte seed and a newline, mode 0600.
//! - `<file>.pub` holds the hex of the 32-byte public key and a newline; tmod's trust list
//!   names trusted keys by this hex string.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub use ed25519_dalek::SigningKey;
use ed25519_dalek::VerifyingKey;
use rand::TryRngCore;

/// Why a key could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Keygen refuses to overwrite a key.
    #[error("{0} exists already: refusing to overwrite a key (move it away or choose another --out)")]
    Exists(PathBuf),
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not hold a key of the expected form.
    #[error("{path} is not a {kind}: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// "secret key file (hex of a 32-byte Ed25519 seed)" or "public key file ...".
        kind: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A hex public key (e.g. from a trust list) is not one.
    #[error("{text:?} is not an Ed25519 public key in hex: {reason}")]
    BadPublicKey {
        /// The text.
        text: String,
        /// What is wrong.
        reason: String,
    },
    /// The secret key and the `.pub` file next to it are not a pair.
    #[error("the public key in {public} does not belong to the secret key in {secret}")]
    Mismatch {
        /// The secret key file.
        secret: PathBuf,
        /// The public key file.
        public: PathBuf,
    },
    /// The operating system's random source failed.
    #[error("no randomness for a new key: {0}")]
    Random(String),
}

const SECRET_KIND: &str = "secret key file (hex of a 32-byte Ed25519 seed)";
const PUBLIC_KIND: &str = "public key file (hex of a 32-byte Ed25519 public key)";

/// `<secret>.pub`: where the public key of a secret key file goes.
pub fn public_key_path(secret: &Path) -> PathBuf {
    let mut name = secret.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// The hex form of a public key (what tmod's trust list holds).
pub fn public_key_hex(key: &VerifyingKey) -> String {
    hex::encode(key.as_bytes())
}

/// Parses a public key from its hex form (64 hex digits, surrounding whitespace ignored).
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, KeyError> {
    tmo_protocol::bundle::public_key_from_hex(text)
        .map_err(|reason| KeyError::BadPublicKey { text: text.to_owned(), reason })
}

fn decode_32(text: &str) -> Result<[u8; 32], String> {
    let text = text.trim();
    let bytes = hex::decode(text).map_err(|e| format!("not hex ({e})"))?;
    bytes.as_slice().try_into().map_err(|_| format!("{} bytes, expected 32", bytes.len()))
}

/// Makes a new key from the operating system's random source and writes `secret` (mode 0600)
/// and `<secret>.pub`; refuses if either exists. Returns the key.
pub fn generate(secret: &Path) -> Result<SigningKey, KeyError> {
    let public = public_key_path(secret);
    for path in [secret, public.as_path()] {
        if path.symlink_metadata().is_ok() {
            return Err(KeyError::Exists(path.to_path_buf()));
        }
    }
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.try_fill_bytes(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
    let key = SigningKey::from_bytes(&seed);
    seed.fill(0);
    write_new(secret, format!("{}\n", hex::encode(key.to_bytes())).as_bytes(), 0o600)?;
    if let Err(e) =
        write_new(&public, format!("{}\n", public_key_hex(&key.verifying_key())).as_bytes(), 0o644)
    {
        // Do not leave a secret without its public half behind.
        let _ = std::fs::remove_file(secret);
        return Err(e);
    }
    Ok(key)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let io = |what| move |source| KeyError::Io { what, path: path.to_path_buf(), source };
    let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            KeyError::Exists(path.to_path_buf())
        } else {
            KeyError::Io { what: "creating", path: path.to_path_buf(), source: e }
        }
    })?;
    file.write_all(bytes).map_err(io("writing"))?;
    file.sync_all().map_err(io("syncing"))?;
    Ok(())
}

fn read_text(path: &Path, kind: &'static str) -> Result<String, KeyError> {
    let bytes = std::fs::read(path).map_err(|source| KeyError::Io {
        what: "reading",
        path: path.to_path_buf(),
        source,
    })?;
    if bytes.len() > 1024 {
        return Err(KeyError::Malformed {
            path: path.to_path_buf(),
            kind,
            reason: format!("{} bytes", bytes.len()),
        });
    }
    String::from_utf8(bytes).map_err(|_| KeyError::Malformed {
        path: path.to_path_buf(),
        kind,
        reason: "not UTF-8 text".into(),
    })
}

/// Reads a secret key file; if `<file>.pub` exists, checks that it holds the matching public key.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let text = read_text(path, SECRET_KIND)?;
    let seed = decode_32(&text).map_err(|reason| KeyError::Malformed {
        path: path.to_path_buf(),
        kind: SECRET_KIND,
        reason,
    })?;
    let key = SigningKey::from_bytes(&seed);
    let public = public_key_path(path);
    if public.exists() {
        let published = load_public_key(&public)?;
        if published != key.verifying_key() {
            return Err(KeyError::Mismatch { secret: path.to_path_buf(), public });
        }
    }
    Ok(key)
}

/// Reads a public key file (`<secret>.pub`).
pub fn load_public_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let text = read_text(path, PUBLIC_KIND)?;
    let bytes = decode_32(&text).map_err(|reason| KeyError::Malformed {
        path: path.to_path_buf(),
        kind: PUBLIC_KIND,
        reason,
    })?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| KeyError::Malformed {
        path: path.to_path_buf(),
        kind: PUBLIC_KIND,
        reason: format!("not a valid curve point ({e})"),
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use ed25519_dalek::{Signer, Verifier};

    use super::*;

    #[test]
    fn keygen_writes_a_private_secret_and_its_public_half_that_load_back() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("fleet.key");
        let key = generate(&secret).unwrap();
        let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&secret).unwrap();
        assert_eq!(text.trim().len(), 64);
        let loaded = load_signing_key(&secret).unwrap();
        assert_eq!(loaded.to_bytes(), key.to_bytes());
        let public = load_public_key(&dir.path().join("fleet.key.pub")).unwrap();
        assert_eq!(public, key.verifying_key());
        let pub_text = std::fs::read_to_string(dir.path().join("fleet.key.pub")).unwrap();
        assert_eq!(parse_public_key(&pub_text).unwrap(), public);
        let signature = loaded.sign(b"manifest");
        assert!(public.verify(b"manifest", &signature).is_ok());
        // Two keys differ.
        let other = generate(&dir.path().join("other.key")).unwrap();
        assert_ne!(other.to_bytes(), key.to_bytes());
    }

    #[test]
    fn keygen_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("k");
        generate(&secret).unwrap();
        let before = std::fs::read(&secret).unwrap();
        assert!(matches!(generate(&secret), Err(KeyError::Exists(p)) if p == secret));
        assert_eq!(std::fs::read(&secret).unwrap(), before);
        // Only the .pub in the way is also refused, and nothing is written.
        let lone = dir.path().join("lone");
        std::fs::write(public_key_path(&lone), b"x").unwrap();
        assert!(matches!(generate(&lone), Err(KeyError::Exists(_))));
        assert!(!lone.exists());
    }

    #[test]
    fn bad_key_files_get_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = load_signing_key(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(missing, KeyError::Io { what: "reading", .. }), "{missing}");
        assert!(missing.to_string().contains("nope"));
        let short = dir.path().join("short");
        std::fs::write(&short, "abcd\n").unwrap();
        let e = load_signing_key(&short).unwrap_err();
        assert!(e.to_string().contains("2 bytes, expected 32"), "{e}");
        let junk = dir.path().join("junk");
        std::fs::write(&junk, "zz".repeat(32)).unwrap();
        assert!(load_signing_key(&junk).unwrap_err().to_string().contains("not hex"));
        // A .pub that belongs to another key.
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        generate(&a).unwrap();
        generate(&b).unwrap();
        std::fs::copy(public_key_path(&b), public_key_path(&a)).unwrap();
        assert!(matches!(load_signing_key(&a), Err(KeyError::Mismatch { .. })));
        assert!(matches!(parse_public_key("12"), Err(KeyError::BadPublicKey { .. })));
    }
}
