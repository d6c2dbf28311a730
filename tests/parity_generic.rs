//! The same parity tests as tests/parity.rs, through candle's generic ops
//! (`LORAGATE_GENERIC_OPS=1`): the code path CUDA, half precision and training take, proven
//! on the CPU against the same PyTorch fixtures and tolerances.

mod common;

const GENERIC: bool = true;

include!("common/parity_cases.rs");

/// The switch really changes the code path: the fused and generic UNet calls differ in the
/// last bits (other summation orders) and agree to float noise.
#[test]
fn the_generic_path_is_another_code_path_with_the_same_numbers() {
    let _mode = setup();
    let pipe = tiny();
    let x = fixture("unet.sample");
    let t = fixture("unet.timestep");
    let c = fixture("unet.context");
    let generic = pipe.unet.forward(&x, &t, &c, None).unwrap();
    loragate::model::ops::set_generic_ops(false);
    let fused = pipe.unet.forward(&x, &t, &c, None).unwrap();
    loragate::model::ops::set_generic_ops(true);
    let d = max_abs_diff(&generic, &fused);
    assert!(d > 0.0, "the switch did not change the code path");
    assert!(d < 1e-4, "fused and generic UNet calls differ by {d}");
}
