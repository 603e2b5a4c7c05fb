//! Tokens and VNC passwords: made from the OS random number generator, and the hash that
//! stores look tokens up by.
use rand::TryRngCore;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use vncdispatch_proto::rules::TOKEN_BYTES;

/// Characters of generated VNC passwords: letters and digits, no look-alikes that users must
/// type (0/O, 1/l/I).
const PASSWORD_ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";

/// Fills `buf` from the OS RNG.
pub fn fill_random(buf: &mut [u8]) -> Result<(), String> {
    OsRng
        .try_fill_bytes(buf)
        .map_err(|e| format!("OS random number generator: {e}"))
}

/// A session token: 30 random bytes, hex (60 characters).
pub fn new_token() -> Result<String, String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    fill_random(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// An 8-character VNC password, uniform over [`PASSWORD_ALPHABET`] (rejection sampling, so no
/// character is likelier than another).
pub fn new_password() -> Result<String, String> {
    let limit = 256 - (256 % PASSWORD_ALPHABET.len());
    let mut out = String::with_capacity(8);
    while out.len() < 8 {
        let mut b = [0u8; 16];
        fill_random(&mut b)?;
        for &x in b.iter().filter(|&&x| (x as usize) < limit) {
            if out.len() < 8 {
                out.push(PASSWORD_ALPHABET[x as usize % PASSWORD_ALPHABET.len()] as char);
            }
        }
    }
    Ok(out)
}

/// A desktop's two passwords: full control and view-only, never the same.
pub fn new_passwords() -> Result<crate::launcher::Passwords, String> {
    let full = new_password()?;
    loop {
        let view_only = new_password()?;
        if view_only != full {
            return Ok(crate::launcher::Passwords { full, view_only });
        }
    }
}

/// Hex SHA-256 of a token: what stores index and look up.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vncdispatch_proto::rules::{validate_password, validate_token};

    #[test]
    fn tokens_and_passwords_have_the_contract_shape() {
        let t = new_token().unwrap();
        assert!(validate_token(&t).is_ok());
        assert_ne!(t, new_token().unwrap());
        let p = new_password().unwrap();
        assert_eq!(p.len(), 8);
        assert!(validate_password(&p).is_ok());
        assert!(p.bytes().all(|b| PASSWORD_ALPHABET.contains(&b)));
        assert_eq!(token_hash("abc").len(), 64);
    }
}
