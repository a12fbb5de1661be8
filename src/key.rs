//! The client's private key for `private_key_jwt`: read once from a PEM
//! file or variable, it signs a new RFC 7523 client assertion for every
//! token request and shows its public half as a JWK for `bulkcall jwks`.
//!
//! The private key is a secret: it has no `Debug` of its own, is zeroed
//! when dropped (jsonwebtoken's `EncodingKey`), and no message quotes it.
//!
//! A leaf below both `config` (which reads the key) and `token/` (which
//! signs with it); [`jws`] is jsonwebtoken's cryptography over ring.

use std::path::Path;
use std::time::{Duration, SystemTime};

use jsonwebtoken::jwk::{Jwk, PublicKeyUse, ThumbprintHash};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::Rng as _;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, RsaKeyPair};
use serde::Serialize;

mod jws;

/// The longest a client assertion may live: SMART Backend Services' rule.
pub const MAX_ASSERTION_LIFETIME: Duration = Duration::from_secs(300);

/// Makes ring jsonwebtoken's cryptography (signing and verifying JWS).
pub fn install_crypto() {
    jws::install();
}

/// Warns when others can read `path`, which holds `what` (a secret).
pub fn warn_if_readable_by_others(path: &Path, what: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o044 != 0
    {
        tracing::warn!(
            "{} holds {what} and can be read by other users; \
                 keep secrets in the environment or run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
}

/// A private key and what it signs with.
pub struct SigningKey {
    key: EncodingKey,
    algorithm: Algorithm,
    kid: String,
    /// The public key as a JWK, `kid`, `alg` and `use` set.
    public: Jwk,
    /// RFC 7638 thumbprint (SHA-256, base64url) of the public key.
    thumbprint: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("algorithm", &self.algorithm).field("kid", &self.kid).finish_non_exhaustive()
    }
}

/// What kind of key a PEM holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Rsa,
    P256,
    P384,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
    jti: String,
}

/// The algorithms a client assertion may be signed with.
pub const ALGORITHMS: &str = "RS256, RS384, RS512, ES256 or ES384";

pub fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    match name.to_ascii_uppercase().as_str() {
        "RS256" => Ok(Algorithm::RS256),
        "RS384" => Ok(Algorithm::RS384),
        "RS512" => Ok(Algorithm::RS512),
        "ES256" => Ok(Algorithm::ES256),
        "ES384" => Ok(Algorithm::ES384),
        _ => Err(format!("algorithm `{name}` is not one bulkcall signs with ({ALGORITHMS})")),
    }
}

impl SigningKey {
    /// Reads a PEM private key (PKCS#8, or PKCS#1 for RSA). `from` names it
    /// in messages (a file or a variable); `algorithm` defaults to RS384 for
    /// RSA, ES256 for P-256, ES384 for P-384; `kid` to the thumbprint.
    pub fn from_pem(pem: &[u8], from: &str, algorithm: Option<&str>, kid: Option<&str>) -> Result<SigningKey, String> {
        jws::install();
        let text = String::from_utf8_lossy(pem);
        if text.contains("ENCRYPTED PRIVATE KEY") {
            return Err(format!(
                "{from} holds an encrypted key: bulkcall reads unencrypted PKCS#8 \
                 (`openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pem`), kept 0600"
            ));
        }
        if text.contains("EC PRIVATE KEY") {
            return Err(format!(
                "{from} holds a SEC1 EC key: convert it to PKCS#8 with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pem`"
            ));
        }
        let (key, kind) = if let Ok(key) = EncodingKey::from_rsa_pem(pem)
            && RsaKeyPair::from_der(key.as_bytes()).is_ok()
        {
            (key, Kind::Rsa)
        } else if let Ok(key) = EncodingKey::from_rsa_pem(pem) {
            let why = RsaKeyPair::from_der(key.as_bytes()).err().map(|e| e.to_string()).unwrap_or_default();
            return Err(format!("{from}: the RSA key is not usable ({why}; at least 2048 bits are needed)"));
        } else if let Ok(key) = EncodingKey::from_ec_pem(pem) {
            let rng = ring::rand::SystemRandom::new();
            let kind = if EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, key.as_bytes(), &rng).is_ok() {
                Kind::P256
            } else if EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, key.as_bytes(), &rng).is_ok() {
                Kind::P384
            } else {
                return Err(format!("{from}: the EC key is on a curve bulkcall does not sign with (P-256 or P-384)"));
            };
            (key, kind)
        } else {
            return Err(format!(
                "{from} holds no PEM private key bulkcall can read: PKCS#8 RSA or EC P-256/P-384 \
                 (`openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:3072`)"
            ));
        };
        let algorithm = match (algorithm.map(parse_algorithm).transpose()?, kind) {
            (None, Kind::Rsa) => Algorithm::RS384,
            (None, Kind::P256) => Algorithm::ES256,
            (None, Kind::P384) => Algorithm::ES384,
            (Some(a @ (Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512)), Kind::Rsa) => a,
            (Some(a @ Algorithm::ES256), Kind::P256) | (Some(a @ Algorithm::ES384), Kind::P384) => a,
            (Some(a), _) => {
                let kind = match kind {
                    Kind::Rsa => "an RSA key (RS256, RS384 or RS512)",
                    Kind::P256 => "a P-256 key (ES256)",
                    Kind::P384 => "a P-384 key (ES384)",
                };
                return Err(format!("{from} is {kind}: it cannot sign {a:?}"));
            }
        };
        let mut public = Jwk::from_encoding_key(&key, algorithm).map_err(|e| format!("{from}: {e}"))?;
        let thumbprint = public.thumbprint(ThumbprintHash::SHA256).map_err(|e| format!("{from}: {e}"))?;
        let kid = kid.map_or_else(|| thumbprint.clone(), str::to_string);
        public.common.key_id = Some(kid.clone());
        public.common.public_key_use = Some(PublicKeyUse::Signature);
        Ok(SigningKey { key, algorithm, kid, public, thumbprint })
    }

    /// [`SigningKey::from_pem`] from a file, with a warning when others
    /// can read it.
    pub fn from_file(path: &Path, algorithm: Option<&str>, kid: Option<&str>) -> Result<SigningKey, String> {
        let from = path.display().to_string();
        let pem = std::fs::read(path).map_err(|e| format!("cannot read the private key {from}: {e}"))?;
        warn_if_readable_by_others(path, "a private key");
        SigningKey::from_pem(&pem, &from, algorithm, kid)
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// The public key as a JWK to register (`kty`, `kid`, `alg`, `use`,
    /// `n`/`e` or `crv`/`x`/`y`): nothing private is in it.
    pub fn public_jwk(&self) -> &Jwk {
        &self.public
    }

    /// A new client assertion: `iss` = `sub` = the client id, `aud`, `iat`
    /// now, `exp` after `lifetime` (at most five minutes), a random `jti`.
    pub fn assertion(&self, client_id: &str, audience: &str, lifetime: Duration) -> Result<String, String> {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
        let lifetime = lifetime.min(MAX_ASSERTION_LIFETIME).as_secs().max(1);
        let jti: String = rand::rng().random::<[u8; 16]>().iter().map(|b| format!("{b:02x}")).collect();
        let claims = Claims { iss: client_id, sub: client_id, aud: audience, iat: now, exp: now + lifetime, jti };
        let mut header = Header::new(self.algorithm);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| format!("cannot sign the client assertion: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rsa_pem() -> String {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256);
        match key {
            Ok(key) => key.serialize_pem(),
            // rcgen over ring cannot make RSA keys: one made by openssl.
            Err(_) => String::from_utf8(
                std::process::Command::new("openssl")
                    .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
                    .output()
                    .expect("openssl")
                    .stdout,
            )
            .unwrap(),
        }
    }

    #[test]
    fn an_assertion_has_the_claims_and_header_smart_asks_for() {
        let pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap().serialize_pem();
        let key = SigningKey::from_pem(pem.as_bytes(), "test key", None, Some("2026-12")).unwrap();
        assert_eq!(key.algorithm(), Algorithm::ES384);
        let jwt = key.assertion("client-1", "https://idp.example.com/token", Duration::from_secs(240)).unwrap();
        let header = jsonwebtoken::decode_header(&jwt).unwrap();
        assert_eq!(
            (header.alg, header.kid.as_deref(), header.typ.as_deref()),
            (Algorithm::ES384, Some("2026-12"), Some("JWT"))
        );
        let claims: serde_json::Value = jsonwebtoken::dangerous::insecure_decode_claims(&jwt).unwrap();
        assert_eq!(claims["iss"], "client-1");
        assert_eq!(claims["sub"], "client-1");
        assert_eq!(claims["aud"], "https://idp.example.com/token");
        assert_eq!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(), 240);
        let again = key.assertion("client-1", "https://idp.example.com/token", Duration::from_secs(900)).unwrap();
        let claims2: serde_json::Value = jsonwebtoken::dangerous::insecure_decode_claims(&again).unwrap();
        assert_ne!(claims["jti"], claims2["jti"], "a new jti every time");
        assert_eq!(claims2["exp"].as_u64().unwrap() - claims2["iat"].as_u64().unwrap(), 300, "five minutes at most");

        let jwk = key.public_jwk();
        let decoding = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::ES384);
        validation.set_audience(&["https://idp.example.com/token"]);
        jsonwebtoken::decode::<serde_json::Value>(&jwt, &decoding, &validation).expect("verifies with the JWK");
        assert!(!format!("{key:?}").contains("PRIVATE"), "no key material in Debug");
    }

    #[test]
    fn rsa_keys_default_to_rs384_and_mismatched_algorithms_are_refused() {
        let pem = rsa_pem();
        let key = SigningKey::from_pem(pem.as_bytes(), "k", None, None).unwrap();
        assert_eq!(key.algorithm(), Algorithm::RS384);
        assert_eq!(key.kid(), key.thumbprint(), "the default kid is the RFC 7638 thumbprint");
        let jwk = serde_json::to_value(key.public_jwk()).unwrap();
        assert_eq!(jwk["kty"], "RSA");
        assert_eq!(jwk["use"], "sig");
        assert!(jwk.get("d").is_none() && jwk.get("p").is_none(), "nothing private: {jwk}");
        let err = SigningKey::from_pem(pem.as_bytes(), "k", Some("ES256"), None).unwrap_err();
        assert!(err.contains("RSA key"), "{err}");
        let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap().serialize_pem();
        assert_eq!(SigningKey::from_pem(p256.as_bytes(), "k", None, None).unwrap().algorithm(), Algorithm::ES256);
        let err = SigningKey::from_pem(p256.as_bytes(), "k", Some("ES384"), None).unwrap_err();
        assert!(err.contains("P-256"), "{err}");
        let err = SigningKey::from_pem(b"not a key", "keys/x.pem", None, None).unwrap_err();
        assert!(err.contains("keys/x.pem"), "{err}");
    }
}
