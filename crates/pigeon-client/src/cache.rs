//! The optional local store: unsent messages, sync position and received messages, so an
//! app restarts without losing a send and shows history offline.

use std::collections::HashMap;
use std::path::Path;

use pigeon_proto::{Message, ThreadId, ThreadSummary};
use rusqlite::{Connection, OptionalExtension, params};

use crate::{Error, Result, Target};

/// A local SQLite cache of one account's messages and unsent sends.
pub struct Cache {
    conn: Connection,
}

/// An unsent message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsent {
    /// Its dedupe id.
    pub client_msg_id: String,
    /// Where it goes.
    pub target: Target,
    /// Its text.
    pub body: String,
}

fn cache_error(error: rusqlite::Error) -> Error {
    Error::Cache(error.to_string())
}

impl Cache {
    /// Opens (or creates) the cache file.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::Cache(e.to_string()))?;
        }
        let conn = Connection::open(path).map_err(cache_error)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS outbox (
                 ord INTEGER PRIMARY KEY AUTOINCREMENT,
                 client_msg_id TEXT NOT NULL UNIQUE,
                 target_kind TEXT NOT NULL,
                 target TEXT NOT NULL,
                 body TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS threads (thread_id TEXT PRIMARY KEY, contiguous INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS messages (
                 thread_id TEXT NOT NULL, seq INTEGER NOT NULL, json TEXT NOT NULL,
                 PRIMARY KEY (thread_id, seq)) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS summaries (thread_id TEXT PRIMARY KEY, ord INTEGER NOT NULL, json TEXT NOT NULL);",
        )
        .map_err(cache_error)?;
        Ok(Self { conn })
    }

    /// The highest contiguous seq held per thread.
    pub fn positions(&self) -> Result<HashMap<ThreadId, u64>> {
        let mut stmt = self
            .conn
            .prepare("SELECT thread_id, contiguous FROM threads")
            .map_err(cache_error)?;
        let rows = stmt
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
            })
            .map_err(cache_error)?;
        let mut positions = HashMap::new();
        for row in rows {
            let (thread, seq) = row.map_err(cache_error)?;
            if let Ok(thread) = thread.parse() {
                positions.insert(thread, u64::try_from(seq).unwrap_or(0));
            }
        }
        Ok(positions)
    }

    /// Messages of a thread held locally, oldest first, up to `limit` before `before`.
    pub fn messages(
        &self,
        thread_id: ThreadId,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<Message>> {
        let before = i64::try_from(before.unwrap_or(u64::MAX)).unwrap_or(i64::MAX);
        let mut stmt = self
            .conn
            .prepare("SELECT json FROM messages WHERE thread_id = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3")
            .map_err(cache_error)?;
        let rows = stmt
            .query_map(params![thread_id.to_string(), before, limit], |row| {
                row.get::<_, String>(0)
            })
            .map_err(cache_error)?;
        let mut messages = Vec::new();
        for json in rows {
            let json = json.map_err(cache_error)?;
            messages.push(serde_json::from_str(&json).map_err(|e| Error::Cache(e.to_string()))?);
        }
        messages.reverse();
        Ok(messages)
    }

    /// Keeps the conversation list, to show it while offline.
    pub fn save_threads(&self, threads: &[ThreadSummary]) -> Result<()> {
        self.conn
            .execute("DELETE FROM summaries", [])
            .map_err(cache_error)?;
        for (ord, thread) in threads.iter().enumerate() {
            let json = serde_json::to_string(thread).map_err(|e| Error::Cache(e.to_string()))?;
            self.conn
                .execute(
                    "INSERT INTO summaries (thread_id, ord, json) VALUES (?1, ?2, ?3)",
                    params![thread.thread_id.to_string(), ord as i64, json],
                )
                .map_err(cache_error)?;
        }
        Ok(())
    }

    /// The conversation list as last saved.
    pub fn threads(&self) -> Result<Vec<ThreadSummary>> {
        let mut stmt = self
            .conn
            .prepare("SELECT json FROM summaries ORDER BY ord")
            .map_err(cache_error)?;
        let rows = stmt
            .query_map([], |row| row.get::<_, String>(0))
            .map_err(cache_error)?;
        let mut threads = Vec::new();
        for json in rows {
            let json = json.map_err(cache_error)?;
            threads.push(serde_json::from_str(&json).map_err(|e| Error::Cache(e.to_string()))?);
        }
        Ok(threads)
    }

    /// Messages not yet acknowledged, in the order they were written.
    pub fn unsent(&self) -> Result<Vec<Unsent>> {
        let mut stmt = self
            .conn
            .prepare("SELECT client_msg_id, target_kind, target, body FROM outbox ORDER BY ord")
            .map_err(cache_error)?;
        let rows = stmt
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                ))
            })
            .map_err(cache_error)?;
        let mut unsent = Vec::new();
        for row in rows {
            let (client_msg_id, kind, target, body) = row.map_err(cache_error)?;
            let target = match (kind.as_str(), target.parse()) {
                ("thread", Ok(thread)) => Target::Thread(thread),
                _ => Target::User(target),
            };
            unsent.push(Unsent {
                client_msg_id,
                target,
                body,
            });
        }
        Ok(unsent)
    }

    /// The per-user event cursor.
    pub(crate) fn event_cursor(&self) -> Result<Option<u64>> {
        self.conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'event_cursor'",
                [],
                |row| row.get::<_, i64>(0),
            )
            .optional()
            .map(|v| v.map(|v| u64::try_from(v).unwrap_or(0)))
            .map_err(cache_error)
    }

    pub(crate) fn set_event_cursor(&self, cursor: u64) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES ('event_cursor', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [i64::try_from(cursor).unwrap_or(i64::MAX)],
            )
            .map(|_| ())
            .map_err(cache_error)
    }

    pub(crate) fn add_unsent(&self, unsent: &Unsent) -> Result<()> {
        let (kind, target) = match &unsent.target {
            Target::Thread(thread) => ("thread", thread.to_string()),
            Target::User(user) => ("user", user.clone()),
        };
        self.conn
            .execute(
                "INSERT OR IGNORE INTO outbox (client_msg_id, target_kind, target, body) VALUES (?1, ?2, ?3, ?4)",
                params![unsent.client_msg_id, kind, target, unsent.body],
            )
            .map(|_| ())
            .map_err(cache_error)
    }

    pub(crate) fn remove_unsent(&self, client_msg_id: &str) -> Result<()> {
        self.conn
            .execute(
                "DELETE FROM outbox WHERE client_msg_id = ?1",
                [client_msg_id],
            )
            .map(|_| ())
            .map_err(cache_error)
    }

    /// Stores a delivered message and advances its thread's position.
    pub(crate) fn delivered(&self, message: &Message) -> Result<()> {
        let json = serde_json::to_string(message).map_err(|e| Error::Cache(e.to_string()))?;
        let thread = message.thread_id.to_string();
        let seq = i64::try_from(message.seq).unwrap_or(i64::MAX);
        self.conn
            .execute(
                "INSERT OR IGNORE INTO messages (thread_id, seq, json) VALUES (?1, ?2, ?3)",
                params![thread, seq, json],
            )
            .map_err(cache_error)?;
        self.set_position(message.thread_id, message.seq)
    }

    pub(crate) fn set_position(&self, thread_id: ThreadId, seq: u64) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO threads (thread_id, contiguous) VALUES (?1, ?2)
                 ON CONFLICT (thread_id) DO UPDATE SET contiguous = max(contiguous, excluded.contiguous)",
                params![thread_id.to_string(), i64::try_from(seq).unwrap_or(i64::MAX)],
            )
            .map(|_| ())
            .map_err(cache_error)
    }
}
