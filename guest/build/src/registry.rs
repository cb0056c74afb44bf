//! Guests in an OCI registry: a trusted job pushes a cached guest once, every other runner pulls
//! it by digest into its own cache, verified, instead of building it.
//!
//! A guest is an OCI image manifest (v1.1) with `artifactType` [`ARTIFACT_TYPE`], the empty
//! config, and three layers: the kernel ([`KERNEL_MEDIA_TYPE`]), the initramfs
//! ([`INITRD_MEDIA_TYPE`]) and kiln's `manifest.json` ([`MANIFEST_MEDIA_TYPE`]). References are
//! written `oci://HOST[:PORT]/REPOSITORY[:TAG][@sha256:HEX]` (see [`Reference`]).
//!
//! Pulling trusts nothing the registry sends: the registry manifest must hash to the digest asked
//! for, and every blob to the digest the manifest gives, before anything is written to the cache;
//! the entry is then stored like a built one (temporary directory + rename) and the registry
//! manifest kept under `oci/` so that later opens check the entry against it. Pushing needs
//! credentials when the registry asks for them (`KILN_REGISTRY_USER` / `KILN_REGISTRY_PASSWORD`,
//! or `docker login`'s `config.json`); Basic and Bearer-token challenges are both answered.
//!
//! HTTP is plain for loopback hosts (a registry a test or a CI job starts beside kiln) and for the
//! hosts listed in `KILN_REGISTRY_PLAIN_HTTP` (comma-separated `HOST[:PORT]`), HTTPS otherwise.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::cache::{self, Cache, GuestImage, Manifest};
use crate::{GuestError, Progress};

/// `artifactType` of a kiln guest.
pub const ARTIFACT_TYPE: &str = "application/vnd.kiln.guest.v1";
/// Media type of the kernel layer.
pub const KERNEL_MEDIA_TYPE: &str = "application/vnd.kiln.guest.kernel.v1";
/// Media type of the initramfs layer (a gzip'd cpio).
pub const INITRD_MEDIA_TYPE: &str = "application/vnd.kiln.guest.initrd.v1+gzip";
/// Media type of kiln's manifest.json layer.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.kiln.guest.manifest.v1+json";
/// The OCI image manifest media type.
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The empty config descriptor of artifacts without a config.
const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY_JSON: &[u8] = b"{}";
/// Largest registry manifest kiln reads (a guest's has four descriptors).
const MAX_MANIFEST: u64 = 1 << 20;
/// Largest blob kiln pulls: a kernel or an initramfs is tens of MB.
const MAX_BLOB: u64 = 1 << 30;
/// The environment variables push and pull take credentials from.
pub const USER_ENV: &str = "KILN_REGISTRY_USER";
/// See [`USER_ENV`].
pub const PASSWORD_ENV: &str = "KILN_REGISTRY_PASSWORD";

/// Why a registry operation failed; one line each.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The reference does not parse or lacks a part the operation needs.
    #[error(
        "guest reference {given:?}: {why} (expected oci://HOST[:PORT]/REPOSITORY[:TAG][@sha256:HEX])"
    )]
    Reference {
        /// What was given.
        given: String,
        /// What is wrong with it.
        why: String,
    },
    /// The registry could not be reached or the connection failed.
    #[error("{url}: {message}")]
    Transport {
        /// The request.
        url: String,
        /// What failed.
        message: String,
    },
    /// The registry answered with an error status.
    #[error("{url}: HTTP {status}: {message}")]
    Status {
        /// The request.
        url: String,
        /// The status code.
        status: u16,
        /// The registry's error message, or what the status means.
        message: String,
    },
    /// The registry wants credentials and none were given.
    #[error(
        "registry {host} requires credentials to {action} {repo}: set {USER_ENV} and \
         {PASSWORD_ENV} (or run `docker login {host}`)"
    )]
    NoCredentials {
        /// The registry.
        host: String,
        /// The repository.
        repo: String,
        /// `push` or `pull`.
        action: &'static str,
    },
    /// The registry refused the credentials given.
    #[error(
        "registry {host} refused the credentials from {from} to {action} {repo} (HTTP {status})"
    )]
    Refused {
        /// The registry.
        host: String,
        /// The repository.
        repo: String,
        /// `push` or `pull`.
        action: &'static str,
        /// Where the credentials came from.
        from: String,
        /// The status code.
        status: u16,
    },
    /// Something the registry sent does not hash to its digest.
    #[error(
        "{what} of {reference}: sha256 {actual}, expected {expected}: the registry sent other \
         bytes than were pushed; refusing it (nothing was placed in the cache)"
    )]
    Digest {
        /// The manifest, or which layer.
        what: String,
        /// The guest reference.
        reference: String,
        /// The digest asked for.
        expected: String,
        /// The digest of what came.
        actual: String,
    },
    /// The registry manifest is not a kiln guest, or is malformed.
    #[error("{reference}: {message}")]
    Invalid {
        /// The guest reference.
        reference: String,
        /// What is wrong.
        message: String,
    },
    /// The credentials configuration is unusable.
    #[error("{0}")]
    Credentials(String),
}

/// A guest's place in a registry: `oci://HOST[:PORT]/REPOSITORY[:TAG][@sha256:HEX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `HOST[:PORT]`.
    pub host: String,
    /// The repository path (`kiln/guest`).
    pub repo: String,
    /// The tag, when given.
    pub tag: Option<String>,
    /// The manifest digest's lower-case hex sha256, when given.
    pub digest: Option<String>,
}

/// The scheme that marks a registry reference where a path could also stand.
pub const SCHEME: &str = "oci://";

impl Reference {
    /// Parses `[oci://]HOST[:PORT]/REPOSITORY[:TAG][@sha256:HEX]`.
    pub fn parse(given: &str) -> Result<Reference, RegistryError> {
        let bad = |why: &str| RegistryError::Reference {
            given: given.to_owned(),
            why: why.to_owned(),
        };
        let rest = given.strip_prefix(SCHEME).unwrap_or(given);
        let (name, digest) = match rest.split_once('@') {
            Some((name, digest)) => {
                let hex = digest
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad("the digest must be sha256:<64 hex digits>"))?;
                if !is_sha256_hex(hex) {
                    return Err(bad("the digest must be sha256:<64 lower-case hex digits>"));
                }
                (name, Some(hex.to_owned()))
            }
            None => (rest, None),
        };
        let (host, path) = name
            .split_once('/')
            .ok_or_else(|| bad("no repository after the registry host"))?;
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        {
            return Err(bad("the registry host must be HOST or HOST:PORT"));
        }
        let (repo, tag) = match path.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag)),
            _ => (path, None),
        };
        let repo_ok = !repo.is_empty()
            && repo.split('/').all(|part| {
                !part.is_empty()
                    && part.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            });
        if !repo_ok {
            return Err(bad(
                "the repository must be lower-case letters, digits, '.', '_', '-' and '/'",
            ));
        }
        if let Some(tag) = tag {
            let ok = !tag.is_empty()
                && tag.len() <= 128
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return Err(bad("the tag must be letters, digits, '.', '_' and '-'"));
            }
        }
        Ok(Reference {
            host: host.to_owned(),
            repo: repo.to_owned(),
            tag: tag.map(str::to_owned),
            digest,
        })
    }

    /// `http://HOST` for loopback hosts and those in `KILN_REGISTRY_PLAIN_HTTP`, else `https://HOST`.
    fn base_url(&self) -> String {
        let bare = match self.host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => self.host.as_str(),
        };
        let loopback = bare == "localhost" || bare == "[::1]" || bare.starts_with("127.");
        let listed = std::env::var("KILN_REGISTRY_PLAIN_HTTP").is_ok_and(|list| {
            list.split(',')
                .any(|h| h.trim() == self.host || h.trim() == bare)
        });
        let scheme = if loopback || listed { "http" } else { "https" };
        format!("{scheme}://{}", self.host)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}", self.host, self.repo)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@sha256:{digest}")?;
        }
        Ok(())
    }
}

fn is_sha256_hex(hex: &str) -> bool {
    hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// One OCI descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

impl Descriptor {
    fn of(media_type: &str, data: &[u8], title: Option<&str>) -> Descriptor {
        let annotations = title
            .map(|t| BTreeMap::from([("org.opencontainers.image.title".to_owned(), t.to_owned())]))
            .unwrap_or_default();
        Descriptor {
            media_type: media_type.to_owned(),
            digest: format!("sha256:{}", cache::sha256_hex(data)),
            size: data.len() as u64,
            annotations,
        }
    }
}

/// An OCI image manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciManifest {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    artifact_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// The kernel, initramfs and kiln-manifest descriptors of a registry manifest that is a guest.
#[derive(Debug)]
struct GuestLayers {
    kernel: Descriptor,
    initrd: Descriptor,
    manifest: Descriptor,
}

fn guest_layers(reference: &str, bytes: &[u8]) -> Result<GuestLayers, RegistryError> {
    let invalid = |message: String| RegistryError::Invalid {
        reference: reference.to_owned(),
        message,
    };
    let manifest: OciManifest = serde_json::from_slice(bytes)
        .map_err(|e| invalid(format!("not an OCI image manifest: {e}")))?;
    if manifest.artifact_type.as_deref() != Some(ARTIFACT_TYPE) {
        return Err(invalid(format!(
            "artifactType {:?}, not a kiln guest ({ARTIFACT_TYPE})",
            manifest.artifact_type.unwrap_or_default()
        )));
    }
    let layer = |media_type: &str| -> Result<Descriptor, RegistryError> {
        let mut found = manifest
            .layers
            .iter()
            .filter(|l| l.media_type == media_type);
        match (found.next(), found.next()) {
            (Some(one), None) => {
                let hex = one.digest.strip_prefix("sha256:").unwrap_or_default();
                if !is_sha256_hex(hex) {
                    return Err(invalid(format!(
                        "layer {media_type}: digest {:?} is not sha256:<64 hex digits>",
                        one.digest
                    )));
                }
                if one.size > MAX_BLOB {
                    return Err(invalid(format!(
                        "layer {media_type}: {} bytes, more than the {MAX_BLOB} a guest may have",
                        one.size
                    )));
                }
                Ok(one.clone())
            }
            (None, _) => Err(invalid(format!("no {media_type} layer"))),
            (Some(_), Some(_)) => Err(invalid(format!("more than one {media_type} layer"))),
        }
    };
    Ok(GuestLayers {
        kernel: layer(KERNEL_MEDIA_TYPE)?,
        initrd: layer(INITRD_MEDIA_TYPE)?,
        manifest: layer(MANIFEST_MEDIA_TYPE)?,
    })
}

/// Opens the entry a stored registry manifest (`path`, its `bytes`) names, checking that the
/// bytes hash to the digest the file is named by and that the entry holds the layers it lists.
pub(crate) fn open_pulled(
    cache: &Cache,
    path: &std::path::Path,
    digest_hex: &str,
    bytes: &[u8],
) -> Result<GuestImage, GuestError> {
    let actual = cache::sha256_hex(bytes);
    if actual != digest_hex {
        return Err(GuestError::Invalid(format!(
            "{}: sha256 {actual}, expected {digest_hex}: the cache entry is damaged or was \
             tampered with; refusing it (pull it again)",
            path.display()
        )));
    }
    let layers = guest_layers(&path.display().to_string(), bytes)?;
    let kernel = layers.kernel.digest.trim_start_matches("sha256:");
    let initrd = layers.initrd.digest.trim_start_matches("sha256:");
    let image = cache.open_dir(&cache.root().join(cache::entry_name(kernel, initrd)))?;
    if image.manifest.kernel.sha256 != kernel || image.manifest.initrd.sha256 != initrd {
        return Err(GuestError::Invalid(format!(
            "{}: names kernel {kernel} and initrd {initrd}, but {} holds others; refusing it",
            path.display(),
            image.dir.display()
        )));
    }
    Ok(image)
}

/// Credentials for one registry, and where they came from (for error messages).
#[derive(Clone)]
pub struct Credentials {
    user: String,
    password: String,
    from: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({} from {})", self.user, self.from)
    }
}

impl Credentials {
    /// `user` / `password`, described as coming from `from`.
    pub fn new(user: &str, password: &str, from: &str) -> Credentials {
        Credentials {
            user: user.to_owned(),
            password: password.to_owned(),
            from: from.to_owned(),
        }
    }

    fn basic(&self) -> String {
        let pair = format!("{}:{}", self.user, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    }

    /// The credentials for `host`: `KILN_REGISTRY_USER` and `KILN_REGISTRY_PASSWORD`, else the
    /// `auths` entry of `$DOCKER_CONFIG/config.json` (or `~/.docker/config.json`), else none.
    pub fn for_host(host: &str) -> Result<Option<Credentials>, RegistryError> {
        let user = std::env::var(USER_ENV).ok().filter(|v| !v.is_empty());
        let password = std::env::var(PASSWORD_ENV).ok().filter(|v| !v.is_empty());
        match (user, password) {
            (Some(user), Some(password)) => {
                return Ok(Some(Credentials::new(
                    &user,
                    &password,
                    &format!("{USER_ENV}/{PASSWORD_ENV}"),
                )))
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(RegistryError::Credentials(format!(
                    "{USER_ENV} and {PASSWORD_ENV} go together: set both or neither"
                )))
            }
            (None, None) => {}
        }
        let config = match std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
            Some(dir) => std::path::PathBuf::from(dir).join("config.json"),
            None => match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
                Some(home) => std::path::PathBuf::from(home).join(".docker/config.json"),
                None => return Ok(None),
            },
        };
        let Ok(text) = std::fs::read(&config) else {
            return Ok(None);
        };
        docker_config_auth(&text, host, &config.display().to_string())
    }
}

/// The credentials `docker login` stored for `host` in a config.json.
fn docker_config_auth(
    text: &[u8],
    host: &str,
    path: &str,
) -> Result<Option<Credentials>, RegistryError> {
    #[derive(Deserialize)]
    struct Config {
        #[serde(default)]
        auths: BTreeMap<String, Auth>,
    }
    #[derive(Deserialize)]
    struct Auth {
        #[serde(default)]
        auth: Option<String>,
    }
    let config: Config = serde_json::from_slice(text)
        .map_err(|e| RegistryError::Credentials(format!("{path}: {e}")))?;
    let entry = config.auths.iter().find(|(key, _)| {
        let key = key
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        key == host || key.strip_suffix("/v2/").or(key.strip_suffix("/v1/")) == Some(host)
    });
    let Some(encoded) = entry.and_then(|(_, a)| a.auth.as_deref()) else {
        return Ok(None);
    };
    let bad = || {
        RegistryError::Credentials(format!(
            "{path}: auths.{host:?}.auth is not base64 of USER:PASSWORD"
        ))
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| bad())?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
    let (user, password) = decoded.split_once(':').ok_or_else(bad)?;
    Ok(Some(Credentials::new(user, password, path)))
}

/// A `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq, Eq)]
enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

fn parse_challenge(header: &str) -> Option<Challenge> {
    let (scheme, params) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    let mut fields = BTreeMap::new();
    let mut rest = params.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (value, next) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"')?;
                (&quoted[..end], &quoted[end + 1..])
            }
            None => after.split_once(',').unwrap_or((after, "")),
        };
        fields.insert(key.trim().to_ascii_lowercase(), value.to_owned());
        rest = next.trim_start().trim_start_matches(',').trim_start();
    }
    if scheme.eq_ignore_ascii_case("basic") {
        Some(Challenge::Basic)
    } else if scheme.eq_ignore_ascii_case("bearer") {
        Some(Challenge::Bearer {
            realm: fields.remove("realm")?,
            service: fields.remove("service"),
            scope: fields.remove("scope"),
        })
    } else {
        None
    }
}

/// A registry's answer.
type Response = ureq::http::Response<ureq::Body>;

/// An HTTP client for one repository that answers authentication challenges once and then sends
/// the resulting `Authorization` with every request.
struct Client {
    agent: ureq::Agent,
    reference: Reference,
    base: String,
    credentials: Option<Credentials>,
    authorization: Option<String>,
    action: &'static str,
}

impl Client {
    fn new(reference: &Reference, action: &'static str) -> Result<Client, RegistryError> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_recv_body(Some(Duration::from_secs(300)))
            // Statuses are answers to read (challenges, the registry's error messages).
            .http_status_as_error(false)
            // Blob downloads may redirect to storage elsewhere (pre-signed, which a registry
            // token would spoil); only the registry itself gets the token again.
            .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
            .build()
            .into();
        Ok(Client {
            agent,
            base: reference.base_url(),
            credentials: Credentials::for_host(&reference.host)?,
            reference: reference.clone(),
            authorization: None,
            action,
        })
    }

    fn url(&self, tail: &str) -> String {
        format!("{}/v2/{}/{tail}", self.base, self.reference.repo)
    }

    /// One request, `Authorization` added when there is one; statuses are not errors here.
    fn request(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Response, RegistryError> {
        let mut request = ureq::http::Request::builder().method(method).uri(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(auth) = &self.authorization {
            request = request.header("Authorization", auth);
        }
        let bad = |message: String| RegistryError::Transport {
            url: url.to_owned(),
            message,
        };
        let sent = match body {
            Some(bytes) => request
                .body(bytes)
                .map_err(|e| bad(e.to_string()))
                .map(|r| self.agent.run(r)),
            None => request
                .body(())
                .map_err(|e| bad(e.to_string()))
                .map(|r| self.agent.run(r)),
        }?;
        sent.map_err(|e| bad(format!("cannot reach the registry: {e}")))
    }

    /// Sends a request, answering one authentication challenge; error statuses become errors.
    fn send(
        &mut self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Response, RegistryError> {
        let mut challenged = false;
        loop {
            let response = self.request(method, url, headers, body)?;
            match response.status().as_u16() {
                200..=399 => return Ok(response),
                401 if !challenged => {
                    challenged = true;
                    let header = header(&response, "www-authenticate").unwrap_or_default();
                    self.authorization = Some(self.authenticate(&header)?);
                }
                status @ (401 | 403) => return Err(self.refused(status)),
                status => {
                    return Err(RegistryError::Status {
                        url: url.to_owned(),
                        status,
                        message: error_message(response),
                    })
                }
            }
        }
    }

    fn refused(&self, status: u16) -> RegistryError {
        match &self.credentials {
            Some(credentials) => RegistryError::Refused {
                host: self.reference.host.clone(),
                repo: self.reference.repo.clone(),
                action: self.action,
                from: credentials.from.clone(),
                status,
            },
            None => RegistryError::NoCredentials {
                host: self.reference.host.clone(),
                repo: self.reference.repo.clone(),
                action: self.action,
            },
        }
    }

    /// The `Authorization` value that answers `challenge`.
    fn authenticate(&self, challenge: &str) -> Result<String, RegistryError> {
        let (realm, service, scope) = match parse_challenge(challenge) {
            Some(Challenge::Basic) | None => {
                return match &self.credentials {
                    Some(credentials) => Ok(credentials.basic()),
                    None => Err(self.refused(401)),
                }
            }
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => (realm, service, scope),
        };
        let scope = scope.unwrap_or_else(|| {
            let actions = if self.action == "push" {
                "pull,push"
            } else {
                "pull"
            };
            format!("repository:{}:{actions}", self.reference.repo)
        });
        let mut url = with_query(&realm, "scope", &scope);
        if let Some(service) = &service {
            url = with_query(&url, "service", service);
        }
        let basic = self.credentials.as_ref().map(Credentials::basic);
        let headers: Vec<(&str, &str)> = basic
            .as_deref()
            .map(|b| ("Authorization", b))
            .into_iter()
            .collect();
        // The token service gets the credentials, never an earlier token.
        let tokenless = Client {
            agent: self.agent.clone(),
            reference: self.reference.clone(),
            base: self.base.clone(),
            credentials: None,
            authorization: None,
            action: self.action,
        };
        let response = tokenless.request("GET", &url, &headers, None)?;
        match response.status().as_u16() {
            200..=299 => {}
            status @ (401 | 403) => return Err(self.refused(status)),
            status => {
                return Err(RegistryError::Status {
                    url: realm,
                    status,
                    message: error_message(response),
                })
            }
        }
        #[derive(Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let body = read_limited(response, MAX_MANIFEST, &realm)?;
        let token: Token = serde_json::from_slice(&body).map_err(|e| RegistryError::Transport {
            url: realm.clone(),
            message: format!("the token answer is not JSON with a token: {e}"),
        })?;
        match token.token.or(token.access_token) {
            Some(token) => Ok(format!("Bearer {token}")),
            None => Err(RegistryError::Transport {
                url: realm,
                message: "the token answer has no token".into(),
            }),
        }
    }

    /// Whether the repository already holds blob `digest`.
    fn has_blob(&mut self, digest: &str) -> Result<bool, RegistryError> {
        let url = self.url(&format!("blobs/{digest}"));
        match self.send("HEAD", &url, &[], None) {
            Ok(_) => Ok(true),
            Err(RegistryError::Status { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Uploads one blob (monolithic: POST for an upload session, then PUT with its digest).
    fn upload(&mut self, descriptor: &Descriptor, data: &[u8]) -> Result<(), RegistryError> {
        if self.has_blob(&descriptor.digest)? {
            return Ok(());
        }
        let start = self.url("blobs/uploads/");
        let response = self.send("POST", &start, &[], Some(&[]))?;
        let location = header(&response, "location").ok_or_else(|| RegistryError::Status {
            url: start.clone(),
            status: response.status().as_u16(),
            message: "the upload answer has no Location".into(),
        })?;
        let location = if location.starts_with("http://") || location.starts_with("https://") {
            location
        } else {
            format!("{}{location}", self.base)
        };
        let url = with_query(&location, "digest", &descriptor.digest);
        self.send(
            "PUT",
            &url,
            &[("Content-Type", "application/octet-stream")],
            Some(data),
        )?;
        Ok(())
    }

    /// Fetches blob `descriptor` and checks its size and digest.
    fn fetch(&mut self, descriptor: &Descriptor, what: &str) -> Result<Vec<u8>, RegistryError> {
        let url = self.url(&format!("blobs/{}", descriptor.digest));
        let response = self.send("GET", &url, &[], None)?;
        let data = read_limited(response, descriptor.size, &url)?;
        check_digest(&data, &descriptor.digest, what, &self.reference)?;
        Ok(data)
    }
}

/// A response header as text.
fn header(response: &Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// `url` with `key=value` (percent-encoded) added to its query.
fn with_query(url: &str, key: &str, value: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    let mut out = format!("{url}{separator}{key}=");
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The body of `response`, refused when longer than `limit`.
fn read_limited(response: Response, limit: u64, url: &str) -> Result<Vec<u8>, RegistryError> {
    let mut data = Vec::new();
    response
        .into_body()
        .into_reader()
        .take(limit.saturating_add(1))
        .read_to_end(&mut data)
        .map_err(|e| RegistryError::Transport {
            url: url.to_owned(),
            message: e.to_string(),
        })?;
    if data.len() as u64 > limit {
        return Err(RegistryError::Transport {
            url: url.to_owned(),
            message: format!("the answer is longer than the {limit} bytes expected"),
        });
    }
    Ok(data)
}

fn check_digest(
    data: &[u8],
    digest: &str,
    what: &str,
    reference: &Reference,
) -> Result<(), RegistryError> {
    let actual = format!("sha256:{}", cache::sha256_hex(data));
    if actual != digest {
        return Err(RegistryError::Digest {
            what: what.to_owned(),
            reference: reference.to_string(),
            expected: digest.to_owned(),
            actual,
        });
    }
    Ok(())
}

/// The registry's own error message (`{"errors":[{"message":…}]}`), else a short body excerpt.
fn error_message(response: Response) -> String {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let status_text = response
        .status()
        .canonical_reason()
        .unwrap_or("error")
        .to_owned();
    let mut body = Vec::new();
    let _ = response
        .into_body()
        .into_reader()
        .take(4096)
        .read_to_end(&mut body);
    if let Ok(errors) = serde_json::from_slice::<Errors>(&body) {
        if !errors.errors.is_empty() {
            return errors
                .errors
                .iter()
                .map(|e| format!("{} {}", e.code, e.message).trim().to_owned())
                .collect::<Vec<_>>()
                .join("; ");
        }
    }
    let text = String::from_utf8_lossy(&body);
    let line = text.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        status_text
    } else {
        line.chars().take(200).collect()
    }
}

/// Pushes cached guest `image` to `reference` (tag `latest` when none is given) and returns the
/// reference with the manifest digest, the form runners pull. The same entry always gives the
/// same digest.
pub fn push(
    image: &GuestImage,
    reference: &Reference,
    progress: &Progress,
) -> Result<Reference, GuestError> {
    if reference.digest.is_some() {
        return Err(RegistryError::Reference {
            given: reference.to_string(),
            why: "push names a tag, not a digest (the registry gives the digest)".into(),
        }
        .into());
    }
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| GuestError::Io {
            path: path.to_owned(),
            source,
        })
    };
    let kernel = read(&image.kernel)?;
    let initrd = read(&image.initrd)?;
    let manifest_json = read(&image.dir.join(cache::MANIFEST_FILE))?;
    let config = Descriptor::of(EMPTY_MEDIA_TYPE, EMPTY_JSON, None);
    let layers = [
        (
            Descriptor::of(KERNEL_MEDIA_TYPE, &kernel, Some(cache::KERNEL_FILE)),
            &kernel,
        ),
        (
            Descriptor::of(INITRD_MEDIA_TYPE, &initrd, Some(cache::INITRD_FILE)),
            &initrd,
        ),
        (
            Descriptor::of(
                MANIFEST_MEDIA_TYPE,
                &manifest_json,
                Some(cache::MANIFEST_FILE),
            ),
            &manifest_json,
        ),
    ];
    let oci = OciManifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.to_owned()),
        artifact_type: Some(ARTIFACT_TYPE.to_owned()),
        config: config.clone(),
        layers: layers.iter().map(|(d, _)| d.clone()).collect(),
    };
    let bytes = serde_json::to_vec(&oci)
        .map_err(|e| GuestError::Invalid(format!("cannot encode the registry manifest: {e}")))?;
    let digest = format!("sha256:{}", cache::sha256_hex(&bytes));

    let mut client = Client::new(reference, "push")?;
    client.upload(&config, EMPTY_JSON)?;
    for (descriptor, data) in &layers {
        progress(&format!(
            "pushing {} ({} bytes)",
            descriptor
                .annotations
                .values()
                .next()
                .map_or("", String::as_str),
            descriptor.size
        ));
        client.upload(descriptor, data)?;
    }
    let tag = reference.tag.as_deref().unwrap_or("latest");
    let url = client.url(&format!("manifests/{tag}"));
    let response = client.send("PUT", &url, &[("Content-Type", OCI_MANIFEST)], Some(&bytes))?;
    if let Some(stored) = header(&response, "docker-content-digest") {
        if stored != digest {
            return Err(GuestError::Invalid(format!(
                "{url}: the registry stored the manifest as {stored}, kiln sent {digest}"
            )));
        }
    }
    Ok(Reference {
        tag: Some(tag.to_owned()),
        digest: Some(digest.trim_start_matches("sha256:").to_owned()),
        ..reference.clone()
    })
}

/// The guest `reference` (which must carry a digest) from `cache`, pulled from its registry and
/// verified first when the cache does not hold it yet. Using a guest already pulled writes
/// nothing and needs no network.
pub fn pull(
    cache: &Cache,
    reference: &Reference,
    progress: &Progress,
) -> Result<GuestImage, GuestError> {
    let Some(digest_hex) = reference.digest.as_deref() else {
        return Err(RegistryError::Reference {
            given: reference.to_string(),
            why: "a guest is pulled by digest: add @sha256:<hex> (kiln guest push prints it)"
                .into(),
        }
        .into());
    };
    match cache.pulled(digest_hex) {
        Some(Ok(image)) => return Ok(image),
        Some(Err(e)) => progress(&format!("{e}: pulling it again")),
        None => {}
    }
    progress(&format!("pulling {reference}"));
    let mut client = Client::new(reference, "pull")?;
    let digest = format!("sha256:{digest_hex}");
    let url = client.url(&format!("manifests/{digest}"));
    let accept = format!("{OCI_MANIFEST}, application/vnd.docker.distribution.manifest.v2+json");
    let response = client
        .send("GET", &url, &[("Accept", &accept)], None)
        .map_err(|e| match e {
            RegistryError::Status { status: 404, .. } => RegistryError::Status {
                url: url.clone(),
                status: 404,
                message: format!(
                    "{reference} is not in the registry (no manifest with that digest)"
                ),
            },
            other => other,
        })?;
    let oci_bytes = read_limited(response, MAX_MANIFEST, &url)?;
    check_digest(&oci_bytes, &digest, "the registry manifest", reference)?;
    let layers = guest_layers(&reference.to_string(), &oci_bytes)?;
    let kernel = client.fetch(&layers.kernel, "the kernel layer")?;
    let initrd = client.fetch(&layers.initrd, "the initrd layer")?;
    let manifest_json = client.fetch(&layers.manifest, "the manifest.json layer")?;
    let manifest: Manifest =
        serde_json::from_slice(&manifest_json).map_err(|e| RegistryError::Invalid {
            reference: reference.to_string(),
            message: format!("its manifest.json layer: {e}"),
        })?;
    let kernel_hex = layers.kernel.digest.trim_start_matches("sha256:");
    let initrd_hex = layers.initrd.digest.trim_start_matches("sha256:");
    if manifest.kernel.sha256 != kernel_hex || manifest.initrd.sha256 != initrd_hex {
        return Err(RegistryError::Invalid {
            reference: reference.to_string(),
            message: "its manifest.json describes another kernel or initrd than its layers".into(),
        }
        .into());
    }
    let _lock = cache.lock()?;
    let image = cache.store(&kernel, &initrd, manifest)?;
    cache.record_pulled(digest_hex, &oci_bytes)?;
    progress(&format!("pulled {reference} into {}", image.dir.display()));
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_with_and_without_scheme_tag_and_digest() {
        let hex = "a".repeat(64);
        let r =
            Reference::parse(&format!("oci://127.0.0.1:5000/kiln/guest:v1@sha256:{hex}")).unwrap();
        assert_eq!(r.host, "127.0.0.1:5000");
        assert_eq!(r.repo, "kiln/guest");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.digest.as_deref(), Some(hex.as_str()));
        assert_eq!(
            r.to_string(),
            format!("oci://127.0.0.1:5000/kiln/guest:v1@sha256:{hex}")
        );
        assert_eq!(r.base_url(), "http://127.0.0.1:5000");
        let r = Reference::parse("ghcr.io/org/kiln-guest").unwrap();
        assert_eq!(r.base_url(), "https://ghcr.io");
        assert_eq!((r.tag, r.digest), (None, None));
    }

    #[test]
    fn bad_references_say_what_is_wrong() {
        for (given, why) in [
            ("oci://host", "no repository"),
            ("oci://host/Upper", "lower-case"),
            ("oci://host/repo@sha256:abc", "64 lower-case hex"),
            ("oci://host/repo@md5:abc", "sha256:<64 hex digits>"),
            ("oci://host/repo:bad tag", "the tag must be"),
            ("oci:///repo", "HOST or HOST:PORT"),
        ] {
            let err = Reference::parse(given).unwrap_err().to_string();
            assert!(err.contains(why), "{given}: {err}");
            assert!(err.contains(&format!("{given:?}")), "{err}");
        }
    }

    #[test]
    fn challenges_parse() {
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull".into()),
            })
        );
        assert_eq!(parse_challenge("Bearer service=x"), None);
    }

    #[test]
    fn docker_config_credentials_are_found_by_host() {
        let auth = base64::engine::general_purpose::STANDARD.encode("me:secret");
        let text = format!(r#"{{"auths":{{"https://reg.example:5000/v1/":{{"auth":"{auth}"}}}}}}"#);
        let found = docker_config_auth(text.as_bytes(), "reg.example:5000", "config.json")
            .unwrap()
            .unwrap();
        assert_eq!(
            (found.user.as_str(), found.password.as_str()),
            ("me", "secret")
        );
        assert!(docker_config_auth(text.as_bytes(), "other", "c")
            .unwrap()
            .is_none());
        let bad = br#"{"auths":{"h":{"auth":"!!"}}}"#;
        let err = docker_config_auth(bad, "h", "c.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.json") && err.contains("base64"), "{err}");
    }

    #[test]
    fn a_registry_manifest_that_is_not_a_guest_is_refused() {
        let other = br#"{"schemaVersion":2,"artifactType":"application/x","config":{"mediaType":"a","digest":"sha256:00","size":2},"layers":[]}"#;
        let err = guest_layers("r", other).unwrap_err().to_string();
        assert!(err.contains("not a kiln guest"), "{err}");
        let hex = "b".repeat(64);
        let missing = format!(
            r#"{{"schemaVersion":2,"artifactType":"{ARTIFACT_TYPE}","config":{{"mediaType":"a","digest":"sha256:{hex}","size":2}},"layers":[{{"mediaType":"{KERNEL_MEDIA_TYPE}","digest":"sha256:{hex}","size":3}}]}}"#
        );
        let err = guest_layers("r", missing.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no application/vnd.kiln.guest.initrd"),
            "{err}"
        );
    }

    /// A registry that wants a Bearer token from its token service, on one loopback port:
    /// answers `requests` connections and returns each request's first line and Authorization.
    fn token_registry(requests: usize) -> (u16, std::thread::JoinHandle<Vec<(String, String)>>) {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            // Never wait forever for a request that does not come: the asserts say what did.
            listener.set_nonblocking(true).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while seen.len() < requests && std::time::Instant::now() < deadline {
                let stream = match listener.accept() {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                stream.set_nonblocking(false).unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let mut auth = String::new();
                loop {
                    let mut header = String::new();
                    reader.read_line(&mut header).unwrap();
                    if header.trim().is_empty() {
                        break;
                    }
                    if let Some((name, value)) = header.split_once(':') {
                        if name.eq_ignore_ascii_case("authorization") {
                            auth = value.trim().to_owned();
                        }
                    }
                }
                let (status, extra, body) = if line.starts_with("GET /token") {
                    ("200 OK", String::new(), r#"{"token":"tok123"}"#.to_owned())
                } else if auth != "Bearer tok123" {
                    (
                        "401 Unauthorized",
                        format!(
                            "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"test-registry\"\r\n"
                        ),
                        String::new(),
                    )
                } else {
                    (
                        "404 Not Found",
                        String::new(),
                        r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#
                            .to_owned(),
                    )
                };
                let mut stream = stream;
                write!(
                    stream,
                    "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
                seen.push((line.trim().to_owned(), auth));
            }
            seen
        });
        (port, server)
    }

    #[test]
    fn a_bearer_challenge_is_answered_with_a_token_for_the_repository() {
        let (port, server) = token_registry(3);
        let dir = tempfile::tempdir().unwrap();
        let reference = Reference::parse(&format!(
            "oci://127.0.0.1:{port}/kiln/guest@sha256:{}",
            "c".repeat(64)
        ))
        .unwrap();
        let err = pull(&Cache::new(dir.path()), &reference, &|_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not in the registry"), "{err}");
        let seen = server.join().unwrap();
        assert!(
            seen[0]
                .0
                .starts_with("GET /v2/kiln/guest/manifests/sha256:"),
            "{seen:?}"
        );
        assert!(seen[1].0.starts_with("GET /token?"), "{seen:?}");
        assert!(seen[1].0.contains("service=test-registry"), "{seen:?}");
        assert!(
            seen[1].0.contains("scope=repository%3Akiln%2Fguest%3Apull"),
            "{seen:?}"
        );
        assert_eq!(seen[2].1, "Bearer tok123", "{seen:?}");
    }
}
