//! Where the model runs: the one device and dtype choice every command, the runner and the TUI worker honour
//! (`--device cpu|cuda[:N]|auto`, `--dtype f32|bf16|f16`). `auto` is CUDA when this build has the `cuda`
//! feature and a GPU answers, else the CPU.

use crate::error::{Error, Result};
use candle_core::{DType, Device};
use std::fmt;
use std::str::FromStr;

/// A device as the user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA device 0 when built with CUDA and one is present, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
                _ => Err(format!("unknown device `{other}` (cpu, cuda, cuda:N or auto)")),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Parse a dtype name (`f32`, `bf16`, `f16`).
pub fn parse_dtype(s: &str) -> std::result::Result<DType, String> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(format!("unknown dtype `{other}` (f32, bf16, f16)")),
    }
}

/// The device and dtype a run uses, chosen once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Compute {
    /// Device.
    pub device: DeviceChoice,
    /// Weights dtype (`None`: the loader's default for the device and file).
    pub dtype: Option<DType>,
}

impl Compute {
    /// The CPU in the loader's default dtype (tests and benchmarks that must not depend on a GPU).
    pub fn cpu() -> Self {
        Compute { device: DeviceChoice::Cpu, dtype: None }
    }

    /// The candle device. `cuda` without a CUDA build, or without that GPU, is an error that says so.
    pub fn device(&self) -> Result<Device> {
        match self.device {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Auto => {
                if candle_core::utils::cuda_is_available() {
                    Device::new_cuda(0).or(Ok(Device::Cpu))
                } else {
                    Ok(Device::Cpu)
                }
            }
            DeviceChoice::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(Error::invalid(format!(
                        "--device cuda:{n}: this steer-heal was built without CUDA (build with `--features cuda`)"
                    )));
                }
                // candle's error may carry a backtrace (RUST_BACKTRACE): the message is its first line.
                Device::new_cuda(n).map_err(|e| {
                    let e = e.to_string();
                    Error::invalid(format!(
                        "--device cuda:{n}: no usable CUDA device ({}); is the NVIDIA driver installed and the GPU \
                         visible?",
                        e.lines().next().unwrap_or("unknown error")
                    ))
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_print_back() {
        for s in ["auto", "cpu", "cuda:0", "cuda:3"] {
            assert_eq!(s.parse::<DeviceChoice>().map(|d| d.to_string()), Ok(s.to_string()));
        }
        assert_eq!("cuda".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(0)));
        assert!("gpu".parse::<DeviceChoice>().is_err());
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
        assert_eq!(parse_dtype("bf16"), Ok(DType::BF16));
        assert!(parse_dtype("f64").is_err());
    }

    #[test]
    fn the_cpu_is_always_there_and_auto_falls_back_to_it() -> Result<()> {
        assert!(Compute::cpu().device()?.is_cpu());
        if !candle_core::utils::cuda_is_available() {
            assert!(Compute::default().device()?.is_cpu());
            assert!(Compute { device: DeviceChoice::Cuda(0), dtype: None }.device().is_err());
        }
        Ok(())
    }
}
