//! Accounts and devices: registration, login, session tokens, logout and revocation.

use std::sync::{Arc, OnceLock};

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use pigeon_bus::{Envelope, Payload};
use pigeon_proto::{DeviceId, DeviceInfo, validate_password, validate_username};
use pigeon_store::{Device, StoreError, User};
use sha2::{Digest, Sha256};

use crate::{Caller, ChatError, ChatService, Result};

/// What a successful login returns.
#[derive(Debug, Clone)]
pub struct LoginOutcome {
    /// The session token: shown once, stored only as a hash.
    pub token: String,
    /// The user.
    pub user: User,
    /// The new device.
    pub device: Device,
}

/// Longest device name kept, in characters.
const MAX_DEVICE_NAME: usize = 64;

impl ChatService {
    /// Creates an account.
    pub async fn register(&self, username: &str, password: &str) -> Result<User> {
        validate_username(username).map_err(|_| ChatError::InvalidUsername)?;
        validate_password(password).map_err(|_| ChatError::InvalidPassword)?;
        let hash = self.hash_password(password.to_owned()).await?;
        match self.store.create_user(username, &hash).await {
            Err(StoreError::Conflict) => Err(ChatError::UsernameTaken),
            other => Ok(other?),
        }
    }

    /// Checks a password and opens a new device session.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        device_name: Option<&str>,
    ) -> Result<LoginOutcome> {
        let user = self.store.get_user_by_username(username).await?;
        // An unknown user costs the same hash as a wrong password: no username probing by timing.
        let stored_hash = match &user {
            Some(user) => user.password_hash.clone(),
            None => self.dummy_hash().await?,
        };
        let valid = self
            .verify_password(password.to_owned(), stored_hash)
            .await?;
        let user = match (user, valid) {
            (Some(user), true) => user,
            _ => return Err(ChatError::InvalidCredentials),
        };
        let name: String = device_name
            .unwrap_or("device")
            .chars()
            .take(MAX_DEVICE_NAME)
            .collect();
        let (token, token_hash) = new_token()?;
        let device = self.store.create_device(user.id, &name, token_hash).await?;
        Ok(LoginOutcome {
            token,
            user,
            device,
        })
    }

    /// Resolves a session token to its device and user.
    pub async fn authenticate(
        &self,
        token: &str,
        conn: Option<pigeon_bus::ConnId>,
    ) -> Result<Caller> {
        if token.is_empty() || token.len() > 256 {
            return Err(ChatError::Unauthorized);
        }
        let (device, user) = self
            .store
            .get_device_by_token(hash_token(token))
            .await?
            .ok_or(ChatError::Unauthorized)?;
        Ok(Caller {
            user_id: user.id,
            username: user.username,
            device_id: device.id,
            conn,
        })
    }

    /// Ends the caller's device session: the token stops working, its connections close.
    pub async fn logout(&self, caller: &Caller) -> Result<()> {
        self.revoke_device(caller, caller.device_id).await
    }

    /// Whether the caller hides their last-seen time (`set_privacy`).
    pub async fn hides_last_seen(&self, caller: &Caller) -> Result<bool> {
        let user = self.store.get_user(caller.user_id).await?;
        Ok(user.is_some_and(|user| user.hide_last_seen))
    }

    /// Lists the caller's devices, marking the one asking.
    pub async fn list_devices(&self, caller: &Caller) -> Result<Vec<DeviceInfo>> {
        let devices = self.store.list_devices(caller.user_id).await?;
        Ok(devices
            .into_iter()
            .map(|device| DeviceInfo {
                current: device.id == caller.device_id,
                device_id: device.id,
                name: device.name,
                created_at: device.created_at,
                last_seen_at: device.last_seen_at,
            })
            .collect())
    }

    /// Revokes one of the caller's devices and closes its connections on every node.
    pub async fn revoke_device(&self, caller: &Caller, device_id: DeviceId) -> Result<()> {
        if !self.store.delete_device(caller.user_id, device_id).await? {
            return Err(ChatError::UnknownDevice);
        }
        let envelope = Envelope {
            users: Arc::from(vec![caller.user_id]),
            skip: None,
            payload: Payload::CloseDevice(device_id),
        };
        self.bus.publish(envelope).await?;
        Ok(())
    }

    async fn hash_password(&self, password: String) -> Result<String> {
        let params = argon2::Params::new(
            self.config.argon2_memory_kib,
            self.config.argon2_iterations,
            1,
            None,
        )
        .map_err(|e| ChatError::Internal(format!("argon2 parameters: {e}")))?;
        let hasher = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        self.hash_blocking(move || {
            hasher
                .hash_password(password.as_bytes())
                .map(|hash| hash.to_string())
                .map_err(|e| ChatError::Internal(format!("hash password: {e}")))
        })
        .await
    }

    /// Runs password hashing work on the blocking pool, at most `max_concurrent_hashes` at once.
    async fn hash_blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let _permit = self
            .hashing
            .acquire()
            .await
            .map_err(|e| ChatError::Internal(e.to_string()))?;
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| ChatError::Internal(e.to_string()))?
    }

    async fn verify_password(&self, password: String, stored_hash: String) -> Result<bool> {
        self.hash_blocking(move || {
            let parsed = PasswordHash::new(&stored_hash)
                .map_err(|e| ChatError::Internal(format!("stored hash: {e}")))?;
            Ok(Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok())
        })
        .await
    }

    /// A hash of a random password, to verify against when the username is unknown.
    async fn dummy_hash(&self) -> Result<String> {
        static DUMMY: OnceLock<String> = OnceLock::new();
        if let Some(hash) = DUMMY.get() {
            return Ok(hash.clone());
        }
        let (random, _) = new_token()?;
        let hash = self.hash_password(random).await?;
        Ok(DUMMY.get_or_init(|| hash).clone())
    }
}

/// Creates a session token (256 random bits, base64url) and its SHA-256 hash.
fn new_token() -> Result<(String, [u8; 32])> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| ChatError::Internal(format!("os random: {e}")))?;
    let token = URL_SAFE_NO_PAD.encode(secret);
    let hash = hash_token(&token);
    Ok((token, hash))
}

/// Tokens are random and long, so a fast hash suffices (no password stretching needed).
fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_hash_stably() {
        let (a, hash_a) = new_token().unwrap();
        let (b, _) = new_token().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 43, "32 bytes in unpadded base64url");
        assert_eq!(hash_token(&a), hash_a);
    }
}
