//! ABUSE's server engine and backends (null, file, cow). The engine lands
//! with the server issue; this crate holds the workspace's place for it.
