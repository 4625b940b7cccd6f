//! Helpers for tests that need a real PostgreSQL: a fresh database per test, dropped
//! afterwards. Compiled for this crate's tests and, with the `test-support` feature, for
//! other crates' tests.
//!
//! `PIGEON_TEST_POSTGRES_URL` names the server (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); set it to the empty string to skip
//! PostgreSQL tests. When it is unset and nothing answers there, the tests fail.

use std::io::Write;
use std::sync::Once;

use tokio_postgres::NoTls;

use crate::PostgresConfig;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A fresh database on the test server, dropped (with its connections) when this is.
pub struct TestDatabase {
    admin_url: String,
    name: String,
}

impl TestDatabase {
    /// Creates the database; `None` (with the reason printed) when PostgreSQL tests are
    /// switched off by an empty `PIGEON_TEST_POSTGRES_URL`.
    pub async fn create() -> Option<Self> {
        let admin_url = match std::env::var("PIGEON_TEST_POSTGRES_URL") {
            Ok(url) if url.is_empty() => {
                // Straight to stderr, past the test harness' capture, so the skip shows.
                static SAID: Once = Once::new();
                SAID.call_once(|| {
                    let _ = writeln!(
                        std::io::stderr(),
                        "skipping the PostgreSQL tests: PIGEON_TEST_POSTGRES_URL is empty"
                    );
                });
                return None;
            }
            Ok(url) => url,
            Err(_) => DEFAULT_URL.to_owned(),
        };
        let name = format!("pigeon_test_{}", uuid::Uuid::now_v7().simple());
        let admin = admin_client(&admin_url).await.unwrap_or_else(|error| {
            panic!(
                "PostgreSQL at {admin_url} is unreachable ({error}); start it, point \
                 PIGEON_TEST_POSTGRES_URL at one, or set it empty to skip these tests"
            )
        });
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "create database {name}: {}",
                    crate::postgres::error::describe(&error)
                )
            });
        Some(Self { admin_url, name })
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its connection string, for a server's `--database`.
    pub fn url(&self) -> String {
        with_dbname(&self.admin_url, &self.name)
    }

    /// The store configuration for this database. Waits are generous: the whole suite
    /// runs at once on a small machine, and a test must not fail because the machine was
    /// busy (a 5 s connect timeout did, once, here).
    pub fn config(&self) -> PostgresConfig {
        PostgresConfig {
            pool_size: 8,
            acquire_timeout: std::time::Duration::from_secs(30),
            ..PostgresConfig::new(self.url())
        }
    }

    /// A connection to the server's administrative database.
    pub async fn admin(&self) -> tokio_postgres::Client {
        admin_client(&self.admin_url)
            .await
            .expect("admin connection")
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which must not block on itself: the drop
        // gets a thread and a runtime of its own.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|error| error.to_string())?;
            runtime.block_on(async {
                let admin = admin_client(&admin_url).await?;
                admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .map_err(|error| crate::postgres::error::describe(&error))
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("could not drop test database {}: {error}", self.name),
            Err(_) => eprintln!("could not drop test database {}", self.name),
        }
    }
}

async fn admin_client(url: &str) -> std::result::Result<tokio_postgres::Client, String> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|error| crate::postgres::error::describe(&error))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            eprintln!(
                "admin connection: {}",
                crate::postgres::error::describe(&error)
            );
        }
    });
    Ok(client)
}

/// The same connection string naming another database.
pub(crate) fn with_dbname(url: &str, dbname: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        // key=value form: a later key wins.
        return format!("{url} dbname={dbname}");
    };
    let (base, query) = match url.find('?') {
        Some(at) => url.split_at(at),
        None => (url, ""),
    };
    let authority_end = base[scheme_end + 3..]
        .find('/')
        .map_or(base.len(), |at| scheme_end + 3 + at);
    format!("{}/{dbname}{query}", &base[..authority_end])
}

#[cfg(test)]
mod tests {
    use super::with_dbname;

    #[test]
    fn connection_strings_get_the_test_database_name() {
        assert_eq!(
            with_dbname("postgres://postgres@127.0.0.1:5432/postgres", "t1"),
            "postgres://postgres@127.0.0.1:5432/t1"
        );
        assert_eq!(
            with_dbname("postgresql://u:p@db/x?sslmode=disable", "t1"),
            "postgresql://u:p@db/t1?sslmode=disable"
        );
        assert_eq!(with_dbname("postgres://db", "t1"), "postgres://db/t1");
        assert_eq!(
            with_dbname("host=/run/postgresql user=postgres", "t1"),
            "host=/run/postgresql user=postgres dbname=t1"
        );
    }
}
