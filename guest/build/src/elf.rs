//! The two facts kiln needs from ELF files: whether an executable asks for a dynamic loader
//! (PT_INTERP), and the `.modinfo` strings of a kernel module. Written by hand because it is a
//! few bounds-checked header reads; a general ELF crate would add a large dependency for this.

/// Why a file could not be read as ELF.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    /// Not an ELF file at all.
    #[error("not an ELF file (no \\x7fELF magic)")]
    NotElf,
    /// ELF, but not the 64-bit little-endian kind kiln handles.
    #[error("not a 64-bit little-endian ELF file")]
    Unsupported,
    /// A header or table points outside the file.
    #[error("truncated ELF file: {0} lies outside the file")]
    Truncated(&'static str),
}

const PT_INTERP: u32 = 3;

fn read_u16(data: &[u8], at: usize, what: &'static str) -> Result<u16, ElfError> {
    let bytes = data.get(at..at + 2).ok_or(ElfError::Truncated(what))?;
    Ok(u16::from_le_bytes([bytes[0], bytes[1]]))
}

fn read_u32(data: &[u8], at: usize, what: &'static str) -> Result<u32, ElfError> {
    let bytes = data.get(at..at + 4).ok_or(ElfError::Truncated(what))?;
    let mut word = [0u8; 4];
    word.copy_from_slice(bytes);
    Ok(u32::from_le_bytes(word))
}

fn read_u64(data: &[u8], at: usize, what: &'static str) -> Result<usize, ElfError> {
    let bytes = data.get(at..at + 8).ok_or(ElfError::Truncated(what))?;
    let mut word = [0u8; 8];
    word.copy_from_slice(bytes);
    usize::try_from(u64::from_le_bytes(word)).map_err(|_| ElfError::Truncated(what))
}

fn check_header(data: &[u8]) -> Result<(), ElfError> {
    if data.get(..4) != Some(b"\x7fELF") {
        return Err(ElfError::NotElf);
    }
    // EI_CLASS = ELFCLASS64, EI_DATA = ELFDATA2LSB.
    if data.get(4) != Some(&2) || data.get(5) != Some(&1) {
        return Err(ElfError::Unsupported);
    }
    Ok(())
}

/// Whether the executable has a PT_INTERP program header (is dynamically linked).
pub fn has_interpreter(data: &[u8]) -> Result<bool, ElfError> {
    check_header(data)?;
    let phoff = read_u64(data, 0x20, "program header offset")?;
    let phentsize = usize::from(read_u16(data, 0x36, "program header size")?);
    let phnum = usize::from(read_u16(data, 0x38, "program header count")?);
    for i in 0..phnum {
        let at = i
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or(ElfError::Truncated("program header"))?;
        if read_u32(data, at, "program header")? == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The bytes of the section called `name`, if the file has one.
pub fn section<'a>(data: &'a [u8], name: &str) -> Result<Option<&'a [u8]>, ElfError> {
    check_header(data)?;
    let shoff = read_u64(data, 0x28, "section header offset")?;
    let shentsize = usize::from(read_u16(data, 0x3a, "section header size")?);
    let shnum = usize::from(read_u16(data, 0x3c, "section header count")?);
    let shstrndx = usize::from(read_u16(data, 0x3e, "section name table index")?);
    let header = |i: usize| -> Result<(u32, &'a [u8]), ElfError> {
        let at = i
            .checked_mul(shentsize)
            .and_then(|o| o.checked_add(shoff))
            .ok_or(ElfError::Truncated("section header"))?;
        let name = read_u32(data, at, "section header")?;
        let offset = read_u64(data, at + 0x18, "section header")?;
        let size = read_u64(data, at + 0x20, "section header")?;
        let end = offset
            .checked_add(size)
            .ok_or(ElfError::Truncated("section"))?;
        let bytes = data
            .get(offset..end)
            .ok_or(ElfError::Truncated("section"))?;
        Ok((name, bytes))
    };
    if shnum == 0 {
        return Ok(None);
    }
    let (_, names) = header(shstrndx)?;
    for i in 0..shnum {
        let (name_at, bytes) = header(i)?;
        let Some(rest) = usize::try_from(name_at).ok().and_then(|n| names.get(n..)) else {
            continue;
        };
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        if &rest[..end] == name.as_bytes() {
            return Ok(Some(bytes));
        }
    }
    Ok(None)
}

/// The `depends=` list of a kernel module's `.modinfo` section (empty when it has none).
pub fn module_depends(data: &[u8]) -> Result<Vec<String>, ElfError> {
    let Some(modinfo) = section(data, ".modinfo")? else {
        return Ok(Vec::new());
    };
    Ok(modinfo
        .split(|&b| b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|list| {
            String::from_utf8_lossy(list)
                .split(',')
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|name| !name.is_empty())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with one program header of type `ptype` and sections
    /// [null, .shstrtab, .modinfo].
    fn tiny_elf(ptype: u32, modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.shstrtab\0.modinfo\0";
        let mut data = vec![0u8; 64];
        data[..4].copy_from_slice(b"\x7fELF");
        data[4] = 2;
        data[5] = 1;
        // Program header right after the ELF header.
        let phoff = data.len();
        let mut ph = vec![0u8; 56];
        ph[..4].copy_from_slice(&ptype.to_le_bytes());
        data.extend_from_slice(&ph);
        let strtab_at = data.len();
        data.extend_from_slice(shstrtab);
        let modinfo_at = data.len();
        data.extend_from_slice(modinfo);
        let shoff = data.len();
        let mut sh = |name: u32, offset: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(offset as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            data.extend_from_slice(&h);
        };
        sh(0, 0, 0);
        sh(1, strtab_at, shstrtab.len());
        sh(11, modinfo_at, modinfo.len());
        data[0x20..0x28].copy_from_slice(&(phoff as u64).to_le_bytes());
        data[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        data[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        data[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        data[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        data[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        data[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        data
    }

    #[test]
    fn finds_the_interpreter_header() {
        assert!(has_interpreter(&tiny_elf(PT_INTERP, b"")).unwrap());
        assert!(!has_interpreter(&tiny_elf(1, b"")).unwrap());
    }

    #[test]
    fn reads_module_dependencies() {
        let elf = tiny_elf(
            1,
            b"license=GPL\0depends=virtio,virtio_ring\0vermagic=6.1\0",
        );
        assert_eq!(module_depends(&elf).unwrap(), ["virtio", "virtio_ring"]);
        let none = tiny_elf(1, b"depends=\0");
        assert!(module_depends(&none).unwrap().is_empty());
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        assert_eq!(has_interpreter(b"#!/bin/sh\n"), Err(ElfError::NotElf));
        let mut elf = tiny_elf(1, b"");
        elf.truncate(66);
        assert!(matches!(has_interpreter(&elf), Err(ElfError::Truncated(_))));
        assert!(matches!(
            section(&elf, ".modinfo"),
            Err(ElfError::Truncated(_))
        ));
    }
}
