//! The `ptxas -v` resource report: parsing ptxas' verbose output, the
//! per-kernel rows build.rs writes to `ptxas_report.tsv`, and readable names
//! for C++-mangled kernel symbols.
//!
//! build.rs includes this file with `#[path]`, so it uses `std` only and no
//! other module of the crate.

use std::fmt::Write as _;

/// What ptxas reports for one function of a cubin: a kernel (an entry) or a
/// device function it kept separate. Sizes are bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FunctionResources {
    /// The symbol as in the cubin (mangled unless `extern "C"`).
    pub symbol: String,
    /// True for kernels (`Compiling entry function`), false for device functions.
    pub entry: bool,
    /// Registers per thread; ptxas prints it for entries only.
    pub registers: Option<u32>,
    /// Named barriers used (`__syncthreads` counts as one).
    pub barriers: u32,
    pub stack_frame: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    /// Static shared memory (dynamic shared memory is a launch parameter).
    pub shared_bytes: u32,
    /// Stack of the entry including the functions it calls.
    pub cumulative_stack: u32,
}

/// Parses the `-v` output of one ptxas run (what nvcc prints for `-Xptxas -v`,
/// possibly mixed with other diagnostics) into the functions it describes, in
/// order of first mention. Lines it does not know are skipped.
pub fn parse_verbose(output: &str) -> Vec<FunctionResources> {
    fn index_of(functions: &mut Vec<FunctionResources>, symbol: &str) -> usize {
        match functions.iter().position(|f| f.symbol == symbol) {
            Some(i) => i,
            None => {
                functions.push(FunctionResources {
                    symbol: symbol.to_string(),
                    ..FunctionResources::default()
                });
                functions.len() - 1
            }
        }
    }
    let mut functions: Vec<FunctionResources> = Vec::new();
    let mut current: Option<usize> = None;
    for line in output.lines() {
        let body = match line.split_once(':') {
            Some((tag, rest)) if tag.trim_start().starts_with("ptxas") => rest.trim(),
            _ => line.trim(),
        };
        if let Some(rest) = body.strip_prefix("Compiling entry function '") {
            if let Some((symbol, _)) = rest.split_once('\'') {
                let i = index_of(&mut functions, symbol);
                functions[i].entry = true;
                current = Some(i);
            }
        } else if let Some(symbol) = body.strip_prefix("Function properties for ") {
            current = Some(index_of(&mut functions, symbol.trim()));
        } else if body.starts_with("Used ") || body.ends_with("spill loads") {
            let Some(i) = current else { continue };
            let f = &mut functions[i];
            for field in body.split(',') {
                let words: Vec<&str> = field.split_whitespace().collect();
                match words.as_slice() {
                    ["Used", n, "registers"] => f.registers = n.parse().ok(),
                    ["used", n, "barriers"] => f.barriers = n.parse().unwrap_or(0),
                    [n, "bytes", "stack", "frame"] => f.stack_frame = n.parse().unwrap_or(0),
                    [n, "bytes", "spill", "stores"] => f.spill_stores = n.parse().unwrap_or(0),
                    [n, "bytes", "spill", "loads"] => f.spill_loads = n.parse().unwrap_or(0),
                    [n, "bytes", "smem"] => f.shared_bytes = n.parse().unwrap_or(0),
                    [n, "bytes", "cumulative", "stack", "size"] => {
                        f.cumulative_stack = n.parse().unwrap_or(0)
                    }
                    _ => {}
                }
            }
        }
    }
    functions
}

/// One row of the kernel report: a kernel of one `kernels/*.cu` file, as
/// compiled for one architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelResources {
    /// The symbol to look the kernel up by in its module.
    pub kernel: String,
    /// `kernel` demangled into a readable name (equal for `extern "C"`).
    pub name: String,
    /// The source file in `kernels/`, e.g. `cast.cu`.
    pub file: String,
    /// The architecture of the SASS, e.g. `sm_89`.
    pub arch: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    /// Static shared memory in bytes.
    pub shared_bytes: u32,
    /// Stack frame in bytes.
    pub stack_frame: u32,
}

/// The columns of `ptxas_report.tsv`, in order.
pub const REPORT_COLUMNS: [&str; 9] = [
    "kernel",
    "name",
    "file",
    "arch",
    "registers",
    "spill_stores",
    "spill_loads",
    "shared_bytes",
    "stack_frame",
];

/// The report rows (entries only) for the functions ptxas reported for
/// `file` compiled for `arch`.
pub fn kernel_rows(
    file: &str,
    arch: &str,
    functions: &[FunctionResources],
) -> Vec<KernelResources> {
    functions
        .iter()
        .filter(|f| f.entry)
        .map(|f| KernelResources {
            kernel: f.symbol.clone(),
            name: readable_name(&f.symbol),
            file: file.to_string(),
            arch: arch.to_string(),
            registers: f.registers.unwrap_or(0),
            spill_stores: f.spill_stores,
            spill_loads: f.spill_loads,
            shared_bytes: f.shared_bytes,
            stack_frame: f.stack_frame,
        })
        .collect()
}

/// Writes rows as tab-separated values with a header line.
pub fn to_tsv(rows: &[KernelResources]) -> String {
    let mut out = REPORT_COLUMNS.join("\t");
    out.push('\n');
    for r in rows {
        let _ = writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            r.kernel,
            r.name,
            r.file,
            r.arch,
            r.registers,
            r.spill_stores,
            r.spill_loads,
            r.shared_bytes,
            r.stack_frame
        );
    }
    out
}

/// Reads what [`to_tsv`] wrote. The error names the line and what is wrong.
pub fn parse_tsv(text: &str) -> Result<Vec<KernelResources>, String> {
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, header)) if header.split('\t').eq(REPORT_COLUMNS) => {}
        Some((_, header)) => {
            return Err(format!(
                "line 1: header is {header:?}, expected {:?}",
                REPORT_COLUMNS.join("\t")
            ))
        }
        None => return Err("empty report (no header line)".to_string()),
    }
    let mut rows = Vec::new();
    for (i, line) in lines {
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        if fields.len() != REPORT_COLUMNS.len() {
            return Err(format!(
                "line {}: {} fields, expected {}",
                i + 1,
                fields.len(),
                REPORT_COLUMNS.len()
            ));
        }
        let number = |k: usize| -> Result<u32, String> {
            fields[k].parse().map_err(|_| {
                format!(
                    "line {}: {} is {:?}, not a number",
                    i + 1,
                    REPORT_COLUMNS[k],
                    fields[k]
                )
            })
        };
        rows.push(KernelResources {
            kernel: fields[0].to_string(),
            name: fields[1].to_string(),
            file: fields[2].to_string(),
            arch: fields[3].to_string(),
            registers: number(4)?,
            spill_stores: number(5)?,
            spill_loads: number(6)?,
            shared_bytes: number(7)?,
            stack_frame: number(8)?,
        });
    }
    Ok(rows)
}

/// A readable name for a kernel symbol: `extern "C"` names as they are,
/// Itanium-mangled names as their qualified name with template arguments and
/// without parameters (`_ZN3trm16row_gather_probeILi256EEEvPKfPfi` ->
/// `trm::row_gather_probe<256>`). What this small decoder does not know (for
/// example substitutions inside template arguments) shows as `<...>`; a symbol
/// it cannot read at all is returned unchanged.
pub fn readable_name(symbol: &str) -> String {
    let Some(rest) = symbol.strip_prefix("_Z") else {
        return symbol.to_string();
    };
    let mut d = Demangler {
        s: rest.as_bytes(),
        pos: 0,
    };
    d.name().unwrap_or_else(|| symbol.to_string())
}

struct Demangler<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Demangler<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// `<name>`: a nested name, `St` + unqualified name, or an unqualified
    /// name, each with optional template arguments.
    fn name(&mut self) -> Option<String> {
        if self.eat(b'N') {
            while matches!(self.peek(), Some(b'r' | b'V' | b'K')) {
                self.pos += 1;
            }
            let mut parts: Vec<String> = Vec::new();
            while !self.eat(b'E') {
                if self.s[self.pos..].starts_with(b"St") {
                    self.pos += 2;
                    parts.push("std".to_string());
                } else if self.peek() == Some(b'I') {
                    let args = self.template_args();
                    parts.last_mut()?.push_str(&args);
                    if self.pos == self.s.len() {
                        break; // arguments not understood: stop here
                    }
                } else {
                    parts.push(self.source_name()?);
                }
            }
            if parts.is_empty() {
                return None;
            }
            return Some(parts.join("::"));
        }
        let mut name = String::new();
        if self.s[self.pos..].starts_with(b"St") {
            self.pos += 2;
            name.push_str("std::");
        }
        name.push_str(&self.source_name()?);
        if self.peek() == Some(b'I') {
            name.push_str(&self.template_args());
        }
        Some(name)
    }

    /// `<length><identifier>`.
    fn source_name(&mut self) -> Option<String> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        let len: usize = std::str::from_utf8(&self.s[start..self.pos])
            .ok()?
            .parse()
            .ok()?;
        let ident = self.s.get(self.pos..self.pos + len)?;
        self.pos += len;
        String::from_utf8(ident.to_vec()).ok()
    }

    /// `I <arg>+ E` rendered as `<a, b>`; `<...>` when an argument is not
    /// understood (the rest of the symbol is then not read).
    fn template_args(&mut self) -> String {
        self.pos += 1; // 'I'
        let mut args = Vec::new();
        while !self.eat(b'E') {
            match self.template_arg() {
                Some(a) => args.push(a),
                None => {
                    self.pos = self.s.len();
                    return "<...>".to_string();
                }
            }
        }
        format!("<{}>", args.join(", "))
    }

    fn template_arg(&mut self) -> Option<String> {
        if self.eat(b'L') {
            let ty = self.peek()?;
            self.pos += 1;
            let negative = self.eat(b'n');
            let start = self.pos;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.pos += 1;
            }
            let digits = std::str::from_utf8(&self.s[start..self.pos]).ok()?;
            if digits.is_empty() || !self.eat(b'E') {
                return None;
            }
            return Some(match (ty, digits) {
                (b'b', "0") => "false".to_string(),
                (b'b', _) => "true".to_string(),
                _ if negative => format!("-{digits}"),
                _ => digits.to_string(),
            });
        }
        self.type_name()
    }

    fn type_name(&mut self) -> Option<String> {
        let c = self.peek()?;
        let builtin = match c {
            b'v' => "void",
            b'b' => "bool",
            b'c' => "char",
            b'a' => "signed char",
            b'h' => "unsigned char",
            b's' => "short",
            b't' => "unsigned short",
            b'i' => "int",
            b'j' => "unsigned int",
            b'l' => "long",
            b'm' => "unsigned long",
            b'x' => "long long",
            b'y' => "unsigned long long",
            b'f' => "float",
            b'd' => "double",
            b'P' => {
                self.pos += 1;
                return Some(format!("{}*", self.type_name()?));
            }
            b'K' => {
                self.pos += 1;
                return Some(format!("const {}", self.type_name()?));
            }
            b'N' | b'0'..=b'9' => return self.name(),
            _ => return None,
        };
        self.pos += 1;
        Some(builtin.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable_names() {
        assert_eq!(readable_name("cast_f32_to_bf16"), "cast_f32_to_bf16");
        assert_eq!(
            readable_name("_Z18dynamic_smem_probePfl"),
            "dynamic_smem_probe"
        );
        assert_eq!(
            readable_name("_ZN3trm16row_gather_probeILi256EEEvPKfPfi"),
            "trm::row_gather_probe<256>"
        );
        assert_eq!(
            readable_name("_ZN3trm6matmulI13__nv_bfloat16Lin3ELb1EEEvPT_"),
            "trm::matmul<__nv_bfloat16, -3, true>"
        );
        assert_eq!(
            readable_name("_ZN3trm6matmulI13__nv_bfloat16S1_EEvPT_"),
            "trm::matmul<...>"
        );
        // Not something this decoder reads: returned as is.
        assert_eq!(readable_name("_ZZ4mainE1x"), "_ZZ4mainE1x");
        assert_eq!(readable_name("_Z"), "_Z");
        assert_eq!(readable_name("_Z99short"), "_Z99short");
    }

    #[test]
    fn tsv_round_trip_and_errors() {
        let rows = vec![KernelResources {
            kernel: "_ZN3trm4bodyILi8EEEvPf".to_string(),
            name: "trm::body<8>".to_string(),
            file: "body.cu".to_string(),
            arch: "sm_89".to_string(),
            registers: 40,
            spill_stores: 0,
            spill_loads: 0,
            shared_bytes: 4096,
            stack_frame: 16,
        }];
        assert_eq!(parse_tsv(&to_tsv(&rows)).unwrap(), rows);
        assert_eq!(parse_tsv(&to_tsv(&[])).unwrap(), vec![]);
        assert!(parse_tsv("").unwrap_err().contains("empty"));
        assert!(parse_tsv("kernel\tname\n").unwrap_err().contains("header"));
        let bad = to_tsv(&rows).replace("\t40\t", "\tforty\t");
        assert!(parse_tsv(&bad).unwrap_err().contains("registers"));
    }
}
