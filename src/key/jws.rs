//! jsonwebtoken's cryptography over ring.
//!
//! jsonwebtoken does the JWS work (headers, encoding, JWKs, RFC 7638
//! thumbprints, claim checks); since version 10 its signatures come from a
//! [`CryptoProvider`] chosen by the program. This is that provider, over
//! ring: the library rustls already uses in bulkcall, so there is one
//! implementation of RSA and ECDSA in the binary and no C library to build.
//! Only the algorithms client assertions use are provided: RS256/384/512
//! (PKCS#1 v1.5) and ES256/384 (fixed-size `r || s` signatures, as JWS
//! wants them).

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::jwk::{EllipticCurve, ThumbprintHash};
use jsonwebtoken::signature::{self, Signer, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey};
use ring::rand::SystemRandom;
use ring::signature::{self as sig, EcdsaKeyPair, KeyPair as _, RsaKeyPair};

/// Makes the ring provider jsonwebtoken's for this process; harmless when
/// called again.
pub fn install() {
    let _ = PROVIDER.install_default();
}

static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: signer,
    verifier_factory: verifier,
    key_utils: KeyUtils {
        rsa_pub_components_from_private_key: rsa_public_of_private,
        rsa_pub_components_from_public_key: rsa_public_of_public,
        ec_pub_components_from_private_key: ec_public_of_private,
        ed_pub_components_from_private_key: |_, _| Err(ErrorKind::UnsupportedAlgorithm.into()),
        compute_digest: digest,
    },
};

/// A signing algorithm and the ring algorithms behind it.
enum Ring {
    Rsa(&'static dyn sig::RsaEncoding, &'static sig::RsaParameters),
    Ecdsa(&'static sig::EcdsaSigningAlgorithm, &'static sig::EcdsaVerificationAlgorithm),
}

fn ring_of(algorithm: Algorithm) -> Result<Ring, Error> {
    Ok(match algorithm {
        Algorithm::RS256 => Ring::Rsa(&sig::RSA_PKCS1_SHA256, &sig::RSA_PKCS1_2048_8192_SHA256),
        Algorithm::RS384 => Ring::Rsa(&sig::RSA_PKCS1_SHA384, &sig::RSA_PKCS1_2048_8192_SHA384),
        Algorithm::RS512 => Ring::Rsa(&sig::RSA_PKCS1_SHA512, &sig::RSA_PKCS1_2048_8192_SHA512),
        Algorithm::ES256 => Ring::Ecdsa(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, &sig::ECDSA_P256_SHA256_FIXED),
        Algorithm::ES384 => Ring::Ecdsa(&sig::ECDSA_P384_SHA384_FIXED_SIGNING, &sig::ECDSA_P384_SHA384_FIXED),
        _ => return Err(ErrorKind::UnsupportedAlgorithm.into()),
    })
}

struct RingSigner {
    algorithm: Algorithm,
    key: Keys,
}

enum Keys {
    Rsa(RsaKeyPair, &'static dyn sig::RsaEncoding),
    Ecdsa(EcdsaKeyPair),
}

fn signer(algorithm: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>, Error> {
    let key = match (ring_of(*algorithm)?, key.family()) {
        (Ring::Rsa(encoding, _), AlgorithmFamily::Rsa) => Keys::Rsa(
            RsaKeyPair::from_der(key.as_bytes()).map_err(|e| ErrorKind::InvalidRsaKey(e.to_string()))?,
            encoding,
        ),
        (Ring::Ecdsa(signing, _), AlgorithmFamily::Ec) => Keys::Ecdsa(
            EcdsaKeyPair::from_pkcs8(signing, key.as_bytes(), &SystemRandom::new())
                .map_err(|_| ErrorKind::InvalidEcdsaKey)?,
        ),
        _ => return Err(ErrorKind::InvalidKeyFormat.into()),
    };
    Ok(Box::new(RingSigner { algorithm: *algorithm, key }))
}

impl Signer<Vec<u8>> for RingSigner {
    fn try_sign(&self, message: &[u8]) -> Result<Vec<u8>, signature::Error> {
        let rng = SystemRandom::new();
        match &self.key {
            Keys::Rsa(pair, encoding) => {
                let mut signature = vec![0; pair.public().modulus_len()];
                pair.sign(*encoding, &rng, message, &mut signature).map_err(|_| signature::Error::new())?;
                Ok(signature)
            }
            Keys::Ecdsa(pair) => Ok(pair.sign(&rng, message).map_err(|_| signature::Error::new())?.as_ref().to_vec()),
        }
    }
}

impl JwtSigner for RingSigner {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

struct RingVerifier {
    algorithm: Algorithm,
    key: DecodingKey,
}

fn verifier(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    let family = match ring_of(*algorithm)? {
        Ring::Rsa(..) => AlgorithmFamily::Rsa,
        Ring::Ecdsa(..) => AlgorithmFamily::Ec,
    };
    if key.family() != family {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    Ok(Box::new(RingVerifier { algorithm: *algorithm, key: key.clone() }))
}

impl Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, message: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        let ring = ring_of(self.algorithm).map_err(|_| signature::Error::new())?;
        let checked = match (ring, self.key.kind()) {
            (Ring::Rsa(_, parameters), DecodingKeyKind::RsaModulusExponent { n, e }) => {
                sig::RsaPublicKeyComponents { n, e }.verify(parameters, message, signature)
            }
            (Ring::Rsa(_, parameters), DecodingKeyKind::SecretOrDer(der)) => {
                sig::UnparsedPublicKey::new(parameters, der).verify(message, signature)
            }
            (Ring::Ecdsa(_, verification), DecodingKeyKind::SecretOrDer(point)) => {
                sig::UnparsedPublicKey::new(verification, point).verify(message, signature)
            }
            (Ring::Ecdsa(..), DecodingKeyKind::RsaModulusExponent { .. }) => {
                return Err(signature::Error::new());
            }
        };
        checked.map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

fn rsa_public_of_private(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let pair = RsaKeyPair::from_der(der).map_err(|e| ErrorKind::InvalidRsaKey(e.to_string()))?;
    let public = sig::RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
    Ok((public.n, public.e))
}

/// Only [`jsonwebtoken::jwk::Jwk::from_decoding_key`] asks for this, and
/// bulkcall never builds a JWK from a public key in DER.
fn rsa_public_of_public(_: &[u8]) -> Result<(Vec<u8>, Vec<u8>), Error> {
    Err(ErrorKind::UnsupportedAlgorithm.into())
}

fn ec_public_of_private(der: &[u8], algorithm: Algorithm) -> Result<(EllipticCurve, Vec<u8>, Vec<u8>), Error> {
    let (signing, curve, size) = match algorithm {
        Algorithm::ES256 => (&sig::ECDSA_P256_SHA256_FIXED_SIGNING, EllipticCurve::P256, 32),
        Algorithm::ES384 => (&sig::ECDSA_P384_SHA384_FIXED_SIGNING, EllipticCurve::P384, 48),
        _ => return Err(ErrorKind::InvalidEcdsaKey.into()),
    };
    let pair = EcdsaKeyPair::from_pkcs8(signing, der, &SystemRandom::new()).map_err(|_| ErrorKind::InvalidEcdsaKey)?;
    // An uncompressed point: 0x04, x, y.
    match pair.public_key().as_ref() {
        [4, point @ ..] if point.len() == 2 * size => {
            let (x, y) = point.split_at(size);
            Ok((curve, x.to_vec(), y.to_vec()))
        }
        _ => Err(ErrorKind::InvalidEcdsaKey.into()),
    }
}

fn digest(data: &[u8], hash: ThumbprintHash) -> Result<Vec<u8>, Error> {
    let algorithm = match hash {
        ThumbprintHash::SHA256 => &ring::digest::SHA256,
        ThumbprintHash::SHA384 => &ring::digest::SHA384,
        ThumbprintHash::SHA512 => &ring::digest::SHA512,
        _ => return Err(ErrorKind::UnsupportedAlgorithm.into()),
    };
    Ok(ring::digest::digest(algorithm, data).as_ref().to_vec())
}
