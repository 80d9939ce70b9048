//! Per-route authentication: API keys and JWTs (HS256 and RS256; `exp`, `nbf`, `aud` and `iss`
//! checked), via the `jsonwebtoken` crate. A request passes with a valid API key *or* a valid
//! bearer token, whichever the route configures. Chosen claims of a valid token are forwarded
//! as headers; the same headers sent by the client are always removed first, so they cannot be
//! forged.
//!
//! A verified token is remembered (up to 10,000 per route), so a client's next requests with it
//! skip the signature check and the JSON decoding; its `exp` and `nbf` are still checked at
//! each use. A token differing in any byte, its signature included, is verified afresh.

use std::collections::{BTreeMap, HashMap};

use http::{HeaderName, HeaderValue, header};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::Mutex;

use crate::headers::Lookup;
use serde::Deserialize;

/// `auth = { ... }` on a route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Accepted API keys.
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Header carrying the API key.
    #[serde(default = "default_key_header")]
    pub api_key_header: String,
    /// Bearer tokens (`Authorization: Bearer <jwt>`).
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
}

fn default_key_header() -> String {
    "x-api-key".into()
}

/// JWT settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// `HS256` or `RS256`.
    pub algorithm: String,
    /// The shared secret (HS256).
    #[serde(default)]
    pub secret: Option<String>,
    /// The public key in PEM (RS256).
    #[serde(default)]
    pub public_key_pem: Option<String>,
    /// Required `iss`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Required `aud`.
    #[serde(default)]
    pub audience: Option<String>,
    /// Seconds of clock skew tolerated on `exp` and `nbf`.
    #[serde(default)]
    pub leeway_s: u64,
    /// Claim → header to forward it in.
    #[serde(default)]
    pub forward_claims: BTreeMap<String, String>,
}

struct Jwt {
    key: DecodingKey,
    validation: Validation,
    /// Tokens verified already, so a client's next requests skip the signature and JSON work.
    verified: Mutex<HashMap<Box<str>, Verified>>,
}

/// Verified tokens kept per route at most; past it the expired ones go, and if that is not
/// enough, all.
const MAX_VERIFIED: usize = 10_000;

/// What a verified token proved: its signature, issuer and audience hold for good; its time
/// window is checked again at each use, as a new decoding would.
#[derive(Debug, Clone)]
struct Verified {
    /// Header values of the forwarded claims, by index into `Auth::forward`.
    claims: Vec<(usize, HeaderValue)>,
    exp: Option<u64>,
    nbf: Option<u64>,
}

impl Verified {
    /// Whether the token is within its time window at `now` (seconds), with `leeway` (the
    /// test `jsonwebtoken` applies).
    fn fresh(&self, now: u64, leeway: u64) -> bool {
        self.exp
            .is_some_and(|exp| exp >= now.saturating_sub(leeway))
            && self.nbf.is_none_or(|nbf| nbf <= now + leeway)
    }
}

/// A route's authentication, compiled.
pub(crate) struct Auth {
    api_keys: Vec<Vec<u8>>,
    api_key_header: HeaderName,
    jwt: Option<Jwt>,
    forward: Vec<(String, HeaderName)>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("api_keys", &self.api_keys.len())
            .field("jwt", &self.jwt.is_some())
            .finish()
    }
}

impl Auth {
    /// Compiles the settings; a bad key or algorithm is an error naming it.
    pub(crate) fn new(config: &AuthConfig) -> Result<Auth, String> {
        let api_key_header = HeaderName::from_bytes(config.api_key_header.as_bytes())
            .map_err(|_| format!("{:?} is not a header name", config.api_key_header))?;
        let jwt = match &config.jwt {
            None => None,
            Some(j) => {
                let (algorithm, key) = match j.algorithm.as_str() {
                    "HS256" => {
                        let secret = j.secret.as_deref().ok_or("HS256 needs a secret")?;
                        (
                            Algorithm::HS256,
                            DecodingKey::from_secret(secret.as_bytes()),
                        )
                    }
                    "RS256" => {
                        let pem = j
                            .public_key_pem
                            .as_deref()
                            .ok_or("RS256 needs public_key_pem")?;
                        let key = DecodingKey::from_rsa_pem(pem.as_bytes())
                            .map_err(|e| format!("public_key_pem: {e}"))?;
                        (Algorithm::RS256, key)
                    }
                    other => return Err(format!("JWT algorithm {other:?}: use HS256 or RS256")),
                };
                let mut validation = Validation::new(algorithm);
                validation.leeway = j.leeway_s;
                validation.validate_nbf = true;
                match &j.audience {
                    Some(aud) => validation.set_audience(&[aud]),
                    None => validation.validate_aud = false,
                }
                if let Some(iss) = &j.issuer {
                    validation.set_issuer(&[iss]);
                }
                Some(Jwt {
                    key,
                    validation,
                    verified: Mutex::new(HashMap::new()),
                })
            }
        };
        let forward = config
            .jwt
            .iter()
            .flat_map(|j| j.forward_claims.iter())
            .map(|(claim, h)| {
                HeaderName::from_bytes(h.as_bytes())
                    .map(|name| (claim.clone(), name))
                    .map_err(|_| format!("{h:?} is not a header name"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Auth {
            api_keys: config
                .api_keys
                .iter()
                .map(|k| k.as_bytes().to_vec())
                .collect(),
            api_key_header,
            jwt,
            forward,
        })
    }

    /// The headers claims are forwarded in: whatever the client sent in them is dropped.
    pub(crate) fn claim_headers(&self) -> impl Iterator<Item = &HeaderName> {
        self.forward.iter().map(|(_, name)| name)
    }

    /// Checks a request's credentials; on success, the claim headers to forward (the
    /// client's own headers of those names must be dropped: see [`Auth::claim_headers`]).
    pub(crate) fn verify(
        &self,
        headers: &(impl Lookup + ?Sized),
    ) -> Result<Vec<(&HeaderName, HeaderValue)>, String> {
        if let Some(key) = headers.value(&self.api_key_header)
            && self
                .api_keys
                .iter()
                .any(|k| keel_net::constant_time_eq(k, key))
        {
            return Ok(Vec::new());
        }
        static AUTHORIZATION: HeaderName = header::AUTHORIZATION;
        let bearer = headers
            .value(&AUTHORIZATION)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let (Some(jwt), Some(token)) = (&self.jwt, bearer) else {
            return Err(if self.jwt.is_some() {
                "send a valid API key or `Authorization: Bearer <token>`".into()
            } else {
                format!("send a valid API key in {}", self.api_key_header)
            });
        };
        let token = token.trim();
        let now = jsonwebtoken::get_current_timestamp();
        let leeway = jwt.validation.leeway;
        let cached = jwt.verified.lock().get(token).cloned();
        let verified = match cached {
            Some(v) if v.fresh(now, leeway) => v,
            _ => {
                let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                    token,
                    &jwt.key,
                    &jwt.validation,
                )
                .map_err(|e| format!("token refused: {e}"))?;
                let claims = self
                    .forward
                    .iter()
                    .enumerate()
                    .filter_map(|(i, (claim, _))| {
                        let value = match data.claims.get(claim)? {
                            serde_json::Value::String(s) => HeaderValue::from_str(s),
                            other => HeaderValue::from_str(&other.to_string()),
                        };
                        value.ok().map(|v| (i, v))
                    })
                    .collect();
                let time = |name: &str| data.claims.get(name).and_then(serde_json::Value::as_u64);
                let verified = Verified {
                    claims,
                    exp: time("exp"),
                    nbf: time("nbf"),
                };
                let mut cache = jwt.verified.lock();
                if cache.len() >= MAX_VERIFIED {
                    cache.retain(|_, v| v.fresh(now, leeway));
                    if cache.len() >= MAX_VERIFIED {
                        cache.clear();
                    }
                }
                cache.insert(token.into(), verified.clone());
                verified
            }
        };
        let claims = verified
            .claims
            .into_iter()
            .map(|(i, v)| (&self.forward[i].1, v))
            .collect();
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs256(secret: &str) -> Auth {
        let config: AuthConfig = toml::from_str(&format!(
            "[jwt]\nalgorithm = \"HS256\"\nsecret = \"{secret}\"\nforward_claims = {{ sub = \"x-user-id\" }}"
        ))
        .unwrap();
        Auth::new(&config).unwrap()
    }

    fn token(secret: &str, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn bearer(token: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        headers
    }

    #[test]
    fn verified_tokens_are_remembered_but_not_trusted_blindly() {
        let auth = hs256("s1");
        let now = jsonwebtoken::get_current_timestamp();
        let good = token("s1", serde_json::json!({ "sub": "ann", "exp": now + 60 }));
        for _ in 0..3 {
            let claims = auth.verify(&bearer(&good)).unwrap();
            assert_eq!(claims.len(), 1);
            assert_eq!(claims[0].0.as_str(), "x-user-id");
            assert_eq!(claims[0].1, "ann");
        }
        let cache = &auth.jwt.as_ref().unwrap().verified;
        assert_eq!(cache.lock().len(), 1, "verified once, then remembered");
        // The same claims signed with another key, and the good token with a changed
        // signature: both refused although the good one is remembered.
        let forged = token(
            "other",
            serde_json::json!({ "sub": "ann", "exp": now + 60 }),
        );
        assert!(auth.verify(&bearer(&forged)).is_err());
        // (A character inside the signature: the last one carries padding bits too.)
        let mut tampered = good.clone().into_bytes();
        let at = tampered.len() - 10;
        tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert!(auth.verify(&bearer(&tampered)).is_err());
        assert_eq!(cache.lock().len(), 1, "refused tokens are not remembered");
        // Expired and not-yet-valid tokens are refused (and never remembered).
        let old = token("s1", serde_json::json!({ "sub": "ann", "exp": now - 10 }));
        assert!(auth.verify(&bearer(&old)).is_err());
        let early = token(
            "s1",
            serde_json::json!({ "sub": "ann", "exp": now + 60, "nbf": now + 30 }),
        );
        assert!(auth.verify(&bearer(&early)).is_err());
    }

    #[test]
    fn a_remembered_token_keeps_to_its_time_window() {
        let v = Verified {
            claims: Vec::new(),
            exp: Some(1_000),
            nbf: Some(900),
        };
        assert!(v.fresh(950, 0));
        assert!(
            v.fresh(1_000, 0),
            "valid through its exp second, as jsonwebtoken has it"
        );
        assert!(!v.fresh(1_001, 0));
        assert!(v.fresh(1_005, 5), "leeway");
        assert!(!v.fresh(899, 0));
        assert!(v.fresh(895, 5));
        let no_exp = Verified { exp: None, ..v };
        assert!(!no_exp.fresh(950, 0));
    }
}
