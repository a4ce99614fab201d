//! The metadata JSON document: operator updates and guest look-ups.

use std::io;

use serde_json::{Map, Value};

/// Largest serialized size of the data store unless the operator sets another limit.
pub const DEFAULT_DATA_STORE_LIMIT: usize = 51200;

/// Errors of the data store.
#[derive(Debug, thiserror::Error)]
pub enum DataStoreError {
    /// The store (or a merge result) must stay a JSON object.
    #[error("The MMDS data store must be a JSON object.")]
    NotAnObject,
    /// The new contents would be larger than the configured limit.
    #[error(
        "The MMDS data store would be {size} bytes once serialized, over its limit of {limit} bytes."
    )]
    LimitExceeded {
        /// Serialized size of the refused contents.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// PATCH before any PUT.
    #[error("The MMDS data store is not initialized.")]
    NotInitialized,
    /// No value at the requested path.
    #[error("The MMDS resource does not exist.")]
    NotFound,
    /// IMDS format only renders objects and strings.
    #[error("Cannot retrieve value. The value has an unsupported type.")]
    UnsupportedValueType,
    /// Serializing a value failed (not expected for values built by serde_json).
    #[error("Cannot serialize MMDS data: {0}")]
    Serialize(#[from] serde_json::Error),
}

/// How a guest look-up is rendered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// The value as compact JSON.
    Json,
    /// EC2 IMDS text: key listings for objects, raw text for strings.
    Imds,
}

/// The metadata document and its size limit.
#[derive(Debug, Clone)]
pub struct MmdsStore {
    data: Value,
    initialized: bool,
    limit: usize,
}

impl Default for MmdsStore {
    fn default() -> Self {
        Self::with_limit(DEFAULT_DATA_STORE_LIMIT)
    }
}

impl MmdsStore {
    /// An empty, uninitialized store whose serialized size may not exceed `limit` bytes.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            data: Value::Object(Map::new()),
            initialized: false,
            limit,
        }
    }

    /// The size limit in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether a PUT has set the contents.
    pub fn is_initialized(&self) -> bool {
        self.initialized
    }

    /// The whole document (an empty object before the first PUT).
    pub fn get(&self) -> &Value {
        &self.data
    }

    /// Replaces the whole document.
    pub fn put(&mut self, data: Value) -> Result<(), DataStoreError> {
        if !data.is_object() {
            return Err(DataStoreError::NotAnObject);
        }
        self.check_size(&data)?;
        self.data = data;
        self.initialized = true;
        Ok(())
    }

    /// Applies an RFC 7396 JSON merge patch; the store is unchanged if the result is refused.
    pub fn patch(&mut self, patch: &Value) -> Result<(), DataStoreError> {
        if !self.initialized {
            return Err(DataStoreError::NotInitialized);
        }
        if !patch.is_object() {
            // A non-object merge patch replaces the document, which would stop being an object.
            return Err(DataStoreError::NotAnObject);
        }
        let mut merged = self.data.clone();
        merge_patch(&mut merged, patch);
        self.check_size(&merged)?;
        self.data = merged;
        Ok(())
    }

    /// Renders the value at a guest URI path such as `/latest/meta-data/` (one trailing
    /// slash is ignored; `/` is the root).
    pub fn fetch(&self, path: &str, format: OutputFormat) -> Result<String, DataStoreError> {
        // Guests asking before the operator provided data get "not found" rather than `{}`,
        // so they can tell "not yet" from "empty".
        if !self.initialized {
            return Err(DataStoreError::NotFound);
        }
        let pointer = path.strip_suffix('/').unwrap_or(path);
        let value = self.data.pointer(pointer).ok_or(DataStoreError::NotFound)?;
        match format {
            OutputFormat::Json => Ok(serde_json::to_string(value)?),
            OutputFormat::Imds => imds_text(value),
        }
    }

    fn check_size(&self, data: &Value) -> Result<(), DataStoreError> {
        let size = serialized_size(data)?;
        if size > self.limit {
            return Err(DataStoreError::LimitExceeded {
                size,
                limit: self.limit,
            });
        }
        Ok(())
    }
}

/// RFC 7396: objects merge key by key, `null` removes a key, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target_map) = target else {
        return;
    };
    for (key, value) in patch_map {
        if value.is_null() {
            target_map.remove(key);
        } else {
            merge_patch(target_map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

fn imds_text(value: &Value) -> Result<String, DataStoreError> {
    match value {
        Value::String(text) => Ok(text.clone()),
        Value::Object(map) => {
            let lines: Vec<String> = map
                .iter()
                .map(|(key, child)| {
                    if child.is_object() {
                        format!("{key}/")
                    } else {
                        key.clone()
                    }
                })
                .collect();
            Ok(lines.join("\n"))
        }
        _ => Err(DataStoreError::UnsupportedValueType),
    }
}

/// Counts serialized bytes without building the string.
fn serialized_size(value: &Value) -> Result<usize, serde_json::Error> {
    struct Counter(usize);
    impl io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 = self.0.saturating_add(buf.len());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    serde_json::to_writer(&mut counter, value)?;
    Ok(counter.0)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn sample() -> MmdsStore {
        let mut store = MmdsStore::default();
        store
            .put(json!({
                "latest": {
                    "meta-data": {
                        "ami-id": "ami-12345678",
                        "reservation-id": "r-fea54097",
                        "network": {"mac": "aa"},
                        "count": 3,
                        "flag": true,
                        "list": ["a", "b"],
                        "nothing": null
                    }
                },
                "user-data": "hello"
            }))
            .unwrap();
        store
    }

    #[test]
    fn put_requires_object_and_initializes() {
        let mut store = MmdsStore::default();
        assert!(!store.is_initialized());
        assert_eq!(store.get(), &json!({}));
        assert!(matches!(
            store.put(json!([1, 2])),
            Err(DataStoreError::NotAnObject)
        ));
        assert!(matches!(
            store.put(json!("x")),
            Err(DataStoreError::NotAnObject)
        ));
        assert!(!store.is_initialized());
        store.put(json!({"a": 1})).unwrap();
        assert!(store.is_initialized());
        store.put(json!({"b": 2})).unwrap();
        assert_eq!(store.get(), &json!({"b": 2}));
    }

    #[test]
    fn patch_before_put_refused() {
        let mut store = MmdsStore::default();
        let err = store.patch(&json!({"a": 1})).unwrap_err();
        assert_eq!(err.to_string(), "The MMDS data store is not initialized.");
    }

    #[test]
    fn patch_merges_per_rfc7396() {
        let mut store = MmdsStore::default();
        store
            .put(json!({"a": "b", "c": {"d": "e", "f": "g"}, "k": [1]}))
            .unwrap();
        store
            .patch(&json!({"a": "z", "c": {"f": null, "h": {"i": 1}}, "k": {"x": 1}, "n": null}))
            .unwrap();
        assert_eq!(
            store.get(),
            &json!({"a": "z", "c": {"d": "e", "h": {"i": 1}}, "k": {"x": 1}})
        );
        assert!(matches!(
            store.patch(&json!("scalar")),
            Err(DataStoreError::NotAnObject)
        ));
    }

    #[test]
    fn size_limit_enforced_on_put_and_patch() {
        let mut store = MmdsStore::with_limit(20);
        // {"a":"0123456789"} is 18 bytes.
        store.put(json!({"a": "0123456789"})).unwrap();
        let err = store.put(json!({"a": "0123456789abc"})).unwrap_err();
        assert!(matches!(
            err,
            DataStoreError::LimitExceeded {
                size: 21,
                limit: 20
            }
        ));
        assert!(err.to_string().contains("limit of 20 bytes"), "{err}");
        assert!(store.patch(&json!({"b": "xyz"})).is_err());
        // A refused patch leaves the store untouched.
        assert_eq!(store.get(), &json!({"a": "0123456789"}));
        store.patch(&json!({"a": "01"})).unwrap();
        assert_eq!(store.get(), &json!({"a": "01"}));
        assert_eq!(DEFAULT_DATA_STORE_LIMIT, MmdsStore::default().limit());
    }

    #[test]
    fn fetch_json() {
        let store = sample();
        assert_eq!(
            store
                .fetch("/latest/meta-data/ami-id", OutputFormat::Json)
                .unwrap(),
            "\"ami-12345678\""
        );
        assert_eq!(
            store
                .fetch("/latest/meta-data/count", OutputFormat::Json)
                .unwrap(),
            "3"
        );
        assert_eq!(
            store
                .fetch("/latest/meta-data/list/", OutputFormat::Json)
                .unwrap(),
            r#"["a","b"]"#
        );
        assert_eq!(
            store
                .fetch("/latest/meta-data/list/1", OutputFormat::Json)
                .unwrap(),
            "\"b\""
        );
        assert_eq!(
            store.fetch("/user-data", OutputFormat::Json).unwrap(),
            "\"hello\""
        );
        let root: Value =
            serde_json::from_str(&store.fetch("/", OutputFormat::Json).unwrap()).unwrap();
        assert_eq!(&root, store.get());
    }

    #[test]
    fn fetch_imds() {
        let store = sample();
        assert_eq!(
            store.fetch("/", OutputFormat::Imds).unwrap(),
            "latest/\nuser-data"
        );
        assert_eq!(
            store.fetch("/latest", OutputFormat::Imds).unwrap(),
            "meta-data/"
        );
        assert_eq!(
            store
                .fetch("/latest/meta-data/", OutputFormat::Imds)
                .unwrap(),
            "ami-id\ncount\nflag\nlist\nnetwork/\nnothing\nreservation-id"
        );
        assert_eq!(
            store
                .fetch("/latest/meta-data/ami-id", OutputFormat::Imds)
                .unwrap(),
            "ami-12345678"
        );
        for unsupported in ["count", "flag", "list", "nothing"] {
            let path = format!("/latest/meta-data/{unsupported}");
            assert!(
                matches!(
                    store.fetch(&path, OutputFormat::Imds),
                    Err(DataStoreError::UnsupportedValueType)
                ),
                "{path}"
            );
        }
    }

    #[test]
    fn fetch_missing() {
        let store = sample();
        for path in ["/nope", "/latest/meta-data/ami-id/x", "latest", "/latest//"] {
            assert!(
                matches!(
                    store.fetch(path, OutputFormat::Json),
                    Err(DataStoreError::NotFound)
                ),
                "{path}"
            );
        }
        let empty = MmdsStore::default();
        assert!(matches!(
            empty.fetch("/", OutputFormat::Imds),
            Err(DataStoreError::NotFound)
        ));
    }

    #[test]
    fn json_pointer_escapes() {
        let mut store = MmdsStore::default();
        store.put(json!({"a/b": "slash", "m~n": "tilde"})).unwrap();
        assert_eq!(store.fetch("/a~1b", OutputFormat::Imds).unwrap(), "slash");
        assert_eq!(store.fetch("/m~0n", OutputFormat::Imds).unwrap(), "tilde");
    }
}
