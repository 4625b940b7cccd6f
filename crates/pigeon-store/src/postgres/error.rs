//! How PostgreSQL and pool failures become [`StoreError`]s, and which ones a transaction
//! retries by itself.

use std::error::Error as _;

use deadpool_postgres::PoolError;
use tokio_postgres::error::SqlState;

use crate::StoreError;

/// The backend's own result type: keeps PostgreSQL's error until the method returns, so the
/// transaction runner can tell a deadlock (retry) from a rule broken (answer).
pub(super) type PgResult<T> = std::result::Result<T, Error>;

/// A failure inside the PostgreSQL backend.
#[derive(Debug)]
pub(super) enum Error {
    /// A rule of the store (not a member, blocked, …): the answer.
    Store(StoreError),
    /// The database or the connection failed.
    Postgres(tokio_postgres::Error),
    /// The pool gave no connection.
    Pool(PoolError),
    /// A concurrent transaction took a unique key first (a dedupe key, a direct pair):
    /// rolled back and run again, when it finds the other's row.
    Retry,
}

impl Error {
    /// Whether running the whole transaction again may succeed: a deadlock, a
    /// serialisation failure, or a key taken by a concurrent transaction.
    pub(super) fn is_transient(&self) -> bool {
        match self {
            Self::Retry => true,
            Self::Postgres(error) => matches!(
                error.code(),
                Some(&SqlState::T_R_DEADLOCK_DETECTED | &SqlState::T_R_SERIALIZATION_FAILURE)
            ),
            Self::Store(_) | Self::Pool(_) => false,
        }
    }
}

impl From<StoreError> for Error {
    fn from(error: StoreError) -> Self {
        Self::Store(error)
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(error: tokio_postgres::Error) -> Self {
        Self::Postgres(error)
    }
}

impl From<PoolError> for Error {
    fn from(error: PoolError) -> Self {
        Self::Pool(error)
    }
}

impl From<Error> for StoreError {
    fn from(error: Error) -> Self {
        match error {
            Error::Store(error) => error,
            Error::Postgres(error) => map_postgres(&error),
            Error::Pool(error) => map_pool(error),
            Error::Retry => {
                StoreError::Unavailable("concurrent writers kept conflicting; retry".into())
            }
        }
    }
}

/// Maps a PostgreSQL error the way the SQLite backend maps SQLite's: any constraint
/// violation is `Conflict`; an unreachable, restarting, overloaded or read-only server, a
/// lost connection and a deadlock that outlived the retries are `Unavailable` (retryable);
/// anything else is `Internal`.
pub(super) fn map_postgres(error: &tokio_postgres::Error) -> StoreError {
    if let Some(db) = error.as_db_error() {
        let code = db.code().code();
        let text = format!("postgresql: {} ({code})", db.message());
        return match &code[..2] {
            // integrity_constraint_violation
            "23" => StoreError::Conflict,
            // connection_exception, transaction_rollback (deadlock, serialization),
            // insufficient_resources (disk full, out of memory, too many connections),
            // operator_intervention (shutdown, cancel, cannot_connect_now)
            "08" | "40" | "53" | "57" => StoreError::Unavailable(text),
            // read_only_sql_transaction: a standby after a failover; lock_not_available.
            _ if code == "25006" || code == "55P03" => StoreError::Unavailable(text),
            _ => StoreError::Internal(text),
        };
    }
    let lost_connection = error.is_closed()
        || error
            .source()
            .is_some_and(|source| source.downcast_ref::<std::io::Error>().is_some())
        || error.to_string().starts_with("timeout");
    if lost_connection {
        StoreError::Unavailable(format!("postgresql connection: {}", describe(error)))
    } else {
        StoreError::Internal(format!("postgresql: {}", describe(error)))
    }
}

/// A pool that cannot hand out a connection means the database cannot be reached (or the
/// store is closed): retryable.
fn map_pool(error: PoolError) -> StoreError {
    match error {
        PoolError::Closed => StoreError::Unavailable("store is closed".into()),
        PoolError::Timeout(kind) => {
            StoreError::Unavailable(format!("postgresql pool: timed out ({kind:?})"))
        }
        PoolError::Backend(error) => {
            StoreError::Unavailable(format!("postgresql unreachable: {}", describe(&error)))
        }
        PoolError::PostCreateHook(error) => {
            StoreError::Unavailable(format!("postgresql connection setup: {error}"))
        }
        PoolError::NoRuntimeSpecified => {
            StoreError::Internal("postgresql pool has no runtime".into())
        }
    }
}

/// The error with its cause: tokio-postgres' own text ("error connecting to server") hides
/// the interesting part in its source.
pub(crate) fn describe(error: &tokio_postgres::Error) -> String {
    match error.source() {
        Some(source) => format!("{error}: {source}"),
        None => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_rules_pass_through_and_retries_give_up_as_unavailable() {
        assert!(matches!(
            StoreError::from(Error::Store(StoreError::Blocked)),
            StoreError::Blocked
        ));
        assert!(Error::Retry.is_transient());
        assert!(matches!(
            StoreError::from(Error::Retry),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            StoreError::from(Error::Pool(PoolError::Closed)),
            StoreError::Unavailable(_)
        ));
    }
}
