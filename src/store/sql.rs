//! Ad-hoc SQL on a drover database, for `drover sql`: opened read-only, so a
//! query can never change state (every write goes through the daemon's typed
//! code).
//!
//! Two locks, either of which alone refuses a write: the file is opened with
//! `SQLITE_OPEN_READONLY` (`mode=ro`), and the connection sets
//! `PRAGMA query_only = ON`. Nothing is migrated and a missing file is an
//! error, never a new database.

use serde_json::{Map, Value};
use sqlx::sqlite::{SqliteConnectOptions, SqliteRow};
use sqlx::{Column, ConnectOptions, Connection, Executor, Row, TypeInfo, ValueRef};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error("no database at {0}")]
    Missing(PathBuf),
    #[error("cannot open database {path} read-only: {message}")]
    Open { path: PathBuf, message: String },
    #[error("refused: this connection is read-only, the query tried to write ({0}); changes go through the drover API")]
    ReadOnly(String),
    #[error("query failed: {0}")]
    Query(String),
}

/// A value bound to `?1`, `?2`, ... in the query.
#[derive(Clone, Debug, PartialEq)]
pub enum SqlParam {
    Integer(i64),
    Real(f64),
    Text(String),
}

impl SqlParam {
    /// An integer if it reads as one, else a real, else text: so `?1` compares
    /// with a millisecond column as a number, and `'2026-12-03 14:00'` as text.
    pub fn infer(raw: &str) -> Self {
        if let Ok(integer) = raw.parse() {
            SqlParam::Integer(integer)
        } else if let Some(real) = raw.parse::<f64>().ok().filter(|r| r.is_finite()) {
            SqlParam::Real(real)
        } else {
            SqlParam::Text(raw.to_string())
        }
    }
}

/// A query's answer: the column names, and each row's values in that order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueryResult {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

impl QueryResult {
    /// Each row as a JSON object keyed by column name.
    pub fn to_objects(&self) -> Vec<Value> {
        self.rows
            .iter()
            .map(|row| {
                let object: Map<String, Value> = self
                    .columns
                    .iter()
                    .cloned()
                    .zip(row.iter().cloned())
                    .collect();
                Value::Object(object)
            })
            .collect()
    }
}

/// Runs `sql` with `params` on the database at `path`, opened read-only.
/// Integers, reals and text come back as JSON numbers and strings, blobs as
/// lowercase hex strings, NULL as null.
pub async fn query_read_only(path: &Path, sql: &str, params: &[SqlParam]) -> Result<QueryResult, SqlError> {
    if !path.is_file() {
        return Err(SqlError::Missing(path.to_path_buf()));
    }
    let open_error = |e: sqlx::Error| SqlError::Open {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .create_if_missing(false)
        .pragma("query_only", "ON")
        .busy_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(open_error)?;
    let mut query = sqlx::query(sql);
    for param in params {
        query = match param {
            SqlParam::Integer(v) => query.bind(*v),
            SqlParam::Real(v) => query.bind(*v),
            SqlParam::Text(v) => query.bind(v.clone()),
        };
    }
    let fetched = query.fetch_all(&mut conn).await;
    let rows = match fetched {
        Ok(rows) => rows,
        Err(e) => {
            let _ = conn.close().await;
            return Err(classify(e));
        }
    };
    let columns = match rows.first() {
        Some(row) => row.columns().iter().map(|c| c.name().to_string()).collect(),
        // No row to read the names from: ask SQLite to describe the statement.
        None => conn
            .describe(sql)
            .await
            .map(|d| d.columns().iter().map(|c| c.name().to_string()).collect())
            .unwrap_or_default(),
    };
    let rows = rows.iter().map(row_values).collect();
    let _ = conn.close().await;
    Ok(QueryResult { columns, rows })
}

fn classify(error: sqlx::Error) -> SqlError {
    if let sqlx::Error::Database(db) = &error {
        // SQLITE_READONLY (8) and its extended codes: a write was refused.
        let primary = db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .map(|c| c & 0xff);
        if primary == Some(8) {
            return SqlError::ReadOnly(db.message().to_string());
        }
        return SqlError::Query(db.message().to_string());
    }
    SqlError::Query(error.to_string())
}

fn row_values(row: &SqliteRow) -> Vec<Value> {
    (0..row.columns().len())
        .map(|i| {
            let Ok(raw) = row.try_get_raw(i) else {
                return Value::Null;
            };
            if raw.is_null() {
                return Value::Null;
            }
            // The value's own storage class: expressions have no declared type.
            match raw.type_info().name() {
                "INTEGER" => row.try_get::<i64, _>(i).map(Value::from).unwrap_or(Value::Null),
                "REAL" => row.try_get::<f64, _>(i).map(Value::from).unwrap_or(Value::Null),
                "BLOB" => row
                    .try_get::<Vec<u8>, _>(i)
                    .map(|bytes| Value::String(bytes.iter().map(|b| format!("{b:02x}")).collect()))
                    .unwrap_or(Value::Null),
                _ => row.try_get::<String, _>(i).map(Value::from).unwrap_or(Value::Null),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use serde_json::json;

    async fn database() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.db");
        let store = Store::open(&path).await.unwrap();
        store.set_meta("colour", "blue").await.unwrap();
        store.close().await;
        (dir, path)
    }

    #[tokio::test]
    async fn reads_rows_with_their_types_and_params() {
        let (_dir, path) = database().await;
        let result = query_read_only(
            &path,
            "SELECT value, ?1 + 1 AS next, 0.5 AS half, NULL AS absent, x'00ff' AS bytes \
             FROM meta WHERE key = ?2",
            &[SqlParam::infer("41"), SqlParam::infer("colour")],
        )
        .await
        .unwrap();
        assert_eq!(result.columns, ["value", "next", "half", "absent", "bytes"]);
        assert_eq!(result.rows, [vec![json!("blue"), json!(42), json!(0.5), Value::Null, json!("00ff")]]);
        assert_eq!(
            result.to_objects(),
            [json!({"value": "blue", "next": 42, "half": 0.5, "absent": null, "bytes": "00ff"})]
        );
        let empty = query_read_only(&path, "SELECT key, value FROM meta WHERE 0", &[])
            .await
            .unwrap();
        assert_eq!(empty.columns, ["key", "value"]);
        assert!(empty.rows.is_empty());
    }

    #[tokio::test]
    async fn every_kind_of_write_is_refused_and_changes_nothing() {
        let (_dir, path) = database().await;
        for statement in [
            "INSERT INTO meta (key, value) VALUES ('k', 'v')",
            "UPDATE meta SET value = 'red'",
            "DELETE FROM meta",
            "DROP TABLE meta",
            "CREATE TABLE intruder (x)",
            "PRAGMA query_only = OFF; UPDATE meta SET value = 'red'",
        ] {
            let error = query_read_only(&path, statement, &[]).await.unwrap_err();
            assert!(matches!(error, SqlError::ReadOnly(_)), "{statement}: {error}");
            assert!(error.to_string().contains("read-only"), "{error}");
        }
        let left = query_read_only(&path, "SELECT key, value FROM meta", &[]).await.unwrap();
        assert_eq!(left.rows, [vec![json!("colour"), json!("blue")]]);
    }

    #[tokio::test]
    async fn a_missing_database_is_an_error_not_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.db");
        let error = query_read_only(&path, "SELECT 1", &[]).await.unwrap_err();
        assert!(matches!(error, SqlError::Missing(_)), "{error}");
        assert!(!path.exists());
    }

    #[test]
    fn params_are_typed_by_their_text() {
        assert_eq!(SqlParam::infer("12"), SqlParam::Integer(12));
        assert_eq!(SqlParam::infer("-3"), SqlParam::Integer(-3));
        assert_eq!(SqlParam::infer("1.5"), SqlParam::Real(1.5));
        assert_eq!(SqlParam::infer("inf"), SqlParam::Text("inf".into()));
        assert_eq!(
            SqlParam::infer("2026-12-03T14:00:00Z"),
            SqlParam::Text("2026-12-03T14:00:00Z".into())
        );
    }
}
