//! The smallest use of hmm: manage a range, move it to a device, and let the
//! CPU's next touch bring it back.
//!
//! Run with `cargo run --example migrate_touch_fault_back`.

use hmm::{Hmm, PAGE_SIZE, Residency};
use hmm_swdev::{SoftwareDevice, SoftwareDeviceConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let hmm = Hmm::new()?;
    let gpu = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("gpu0", 16 << 20))?;

    // Memory hmm manages: ordinary anonymous memory, written by the CPU.
    let r = hmm.alloc(64 * PAGE_SIZE)?;
    r.write(0, b"written by the CPU before the migration")?;

    // Move it into the device's memory. The CPU mapping is gone now.
    let report = gpu.migrate_to_device(r.range())?;
    println!("migrated {} pages to {}", report.migrated, gpu.memory().name());
    assert!(matches!(r.residency(0), Residency::Device(_)));

    // The device reads and writes it through its own page table.
    gpu.write(r.addr(), b"WRITTEN")?;

    // A CPU touch faults the page back: the read sees the device's write.
    let mut buf = [0u8; 39];
    r.read(0, &mut buf)?;
    println!("the CPU reads: {}", String::from_utf8_lossy(&buf));
    assert_eq!(&buf[..7], b"WRITTEN");
    assert_eq!(r.residency(0), Residency::System);
    println!("{}", r.residency_map());
    Ok(())
}
