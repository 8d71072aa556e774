//! Placeholder until the decompressors land: plain modules only.

/// Why a payload did not decompress.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DecompressError(String);

/// A kernel module as shipped (`.ko` only in this placeholder).
pub fn module(file_name: &str, bytes: &[u8]) -> Result<Vec<u8>, DecompressError> {
    if file_name.ends_with(".ko") {
        Ok(bytes.to_vec())
    } else {
        Err(DecompressError(format!(
            "{file_name}: compressed modules not yet supported"
        )))
    }
}
