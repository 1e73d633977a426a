//! The kernel ABI generator: parses the argument structs of `kernels/abi.h`
//! (a restricted C syntax, described at the top of that file) and the
//! `extern "C" __global__` kernel declarations of `kernels/*.cu`, computes the
//! C layout of every struct, and writes
//! - the `#[repr(C)]` Rust mirror of the structs, with compile-time size and
//!   offset checks, and a typed [`Kernel`](super::abi::Kernel) handle per kernel;
//! - for the CPU emulator: a C++ file with the same size and offset checks
//!   (`static_assert`) and one `TRM_EMU_ENTRY` per kernel, and the Rust
//!   declarations of those entry points.
//!
//! Both sides check the layout this generator computed, so a struct cannot
//! differ between C++ and Rust without a compile error on one side.
//!
//! build.rs includes this file with `#[path]`, so it uses `std` only.

use std::fmt::Write as _;

/// A scalar type allowed in abi.h.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scalar {
    F32,
    F64,
    I32,
    U32,
    I64,
    U64,
    U8,
    U16,
    Bf16,
    /// Only behind a pointer.
    Void,
}

impl Scalar {
    fn parse(word: &str) -> Option<Scalar> {
        Some(match word {
            "float" => Scalar::F32,
            "double" => Scalar::F64,
            "int32_t" | "int" => Scalar::I32,
            "uint32_t" | "unsigned" => Scalar::U32,
            "int64_t" | "long" => Scalar::I64,
            "uint64_t" => Scalar::U64,
            "uint8_t" => Scalar::U8,
            "uint16_t" => Scalar::U16,
            "bf16" => Scalar::Bf16,
            "void" => Scalar::Void,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Scalar::U8 | Scalar::Void => 1,
            Scalar::U16 | Scalar::Bf16 => 2,
            Scalar::F32 | Scalar::I32 | Scalar::U32 => 4,
            Scalar::F64 | Scalar::I64 | Scalar::U64 => 8,
        }
    }

    fn rust(self) -> &'static str {
        match self {
            Scalar::F32 => "f32",
            Scalar::F64 => "f64",
            Scalar::I32 => "i32",
            Scalar::U32 => "u32",
            Scalar::I64 => "i64",
            Scalar::U64 => "u64",
            Scalar::U8 => "u8",
            Scalar::U16 => "u16",
            Scalar::Bf16 => "::half::bf16",
            Scalar::Void => "::core::ffi::c_void",
        }
    }

    fn rust_zero(self) -> &'static str {
        match self {
            Scalar::F32 | Scalar::F64 => "0.0",
            Scalar::Bf16 => "::half::bf16::ZERO",
            _ => "0",
        }
    }
}

/// A field's type: a scalar by value, or a pointer to one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    Value(Scalar),
    Ptr { pointee: Scalar, is_const: bool },
}

impl FieldType {
    fn size(self) -> usize {
        match self {
            FieldType::Value(s) => s.size(),
            FieldType::Ptr { .. } => 8,
        }
    }

    fn rust(self) -> String {
        match self {
            FieldType::Value(s) => s.rust().to_string(),
            FieldType::Ptr {
                pointee,
                is_const: true,
            } => format!("*const {}", pointee.rust()),
            FieldType::Ptr {
                pointee,
                is_const: false,
            } => format!("*mut {}", pointee.rust()),
        }
    }

    fn rust_default(self) -> &'static str {
        match self {
            FieldType::Value(s) => s.rust_zero(),
            FieldType::Ptr { is_const: true, .. } => "::core::ptr::null()",
            FieldType::Ptr {
                is_const: false, ..
            } => "::core::ptr::null_mut()",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub ty: FieldType,
    pub doc: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Struct {
    pub name: String,
    pub doc: Vec<String>,
    pub fields: Vec<Field>,
}

/// C layout (natural alignment, as on x86-64 and aarch64 Linux and nvcc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub size: usize,
    pub align: usize,
    pub offsets: Vec<usize>,
}

impl Struct {
    pub fn layout(&self) -> Layout {
        let mut offset = 0usize;
        let mut align = 1usize;
        let mut offsets = Vec::with_capacity(self.fields.len());
        for f in &self.fields {
            let a = f.ty.size();
            offset = offset.div_ceil(a) * a;
            offsets.push(offset);
            offset += a;
            align = align.max(a);
        }
        Layout {
            size: offset.div_ceil(align) * align,
            align,
            offsets,
        }
    }
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses the structs of an ABI header. `file` names it in errors.
pub fn parse_header(text: &str, file: &str) -> Result<Vec<Struct>, String> {
    let mut structs: Vec<Struct> = Vec::new();
    let mut doc: Vec<String> = Vec::new();
    let mut open: Option<Struct> = None;
    for (i, raw) in text.lines().enumerate() {
        let at = || format!("{file}:{}", i + 1);
        let (code, comment) = match raw.find("//") {
            Some(c) => (raw[..c].trim(), Some(raw[c + 2..].trim())),
            None => (raw.trim(), None),
        };
        if code.is_empty() {
            match comment {
                // A rule line (`// ----`) or a blank line ends a doc block.
                Some(c) if !c.is_empty() && !c.starts_with("---") => doc.push(c.to_string()),
                _ => doc.clear(),
            }
            continue;
        }
        if code.starts_with('#') || (open.is_none() && code.starts_with("typedef ")) {
            doc.clear();
            continue;
        }
        if let Some(s) = open.as_mut() {
            if code == "};" {
                if s.fields.is_empty() {
                    return Err(format!("{}: struct {} has no fields", at(), s.name));
                }
                structs.push(open.take().expect("open struct"));
                doc.clear();
                continue;
            }
            let decl = code.strip_suffix(';').ok_or_else(|| {
                format!(
                    "{}: expected a field `type name;` or `}};`, found {code:?}",
                    at()
                )
            })?;
            let decl = decl.replace('*', " * ");
            let mut words: Vec<&str> = decl.split_whitespace().collect();
            let is_const = words.first() == Some(&"const");
            if is_const {
                words.remove(0);
            }
            let (ty_word, is_ptr, name) = match words.as_slice() {
                [ty, name] => (*ty, false, *name),
                [ty, "*", name] => (*ty, true, *name),
                _ => {
                    return Err(format!(
                        "{}: field {code:?} is not `[const] type [*] name;` (one field per line)",
                        at()
                    ))
                }
            };
            let scalar = Scalar::parse(ty_word).ok_or_else(|| {
                format!(
                    "{}: type {ty_word:?} is not one of float, double, int32_t, uint32_t, int64_t, \
                     uint64_t, uint8_t, uint16_t, bf16, void",
                    at()
                )
            })?;
            if !is_ident(name) {
                return Err(format!(
                    "{}: field name {name:?} is not an identifier",
                    at()
                ));
            }
            let ty = if is_ptr {
                FieldType::Ptr {
                    pointee: scalar,
                    is_const,
                }
            } else if scalar == Scalar::Void {
                return Err(format!("{}: void field {name:?} (only void*)", at()));
            } else {
                FieldType::Value(scalar)
            };
            if s.fields.iter().any(|f| f.name == name) {
                return Err(format!("{}: field {name:?} repeated in {}", at(), s.name));
            }
            let mut field_doc = std::mem::take(&mut doc);
            if let Some(c) = comment.filter(|c| !c.is_empty()) {
                field_doc.push(c.to_string());
            }
            s.fields.push(Field {
                name: name.to_string(),
                ty,
                doc: field_doc,
            });
            continue;
        }
        let name = code
            .strip_prefix("struct ")
            .and_then(|r| r.strip_suffix('{'))
            .map(str::trim)
            .filter(|n| is_ident(n))
            .ok_or_else(|| {
                format!(
                    "{}: expected `struct Name {{`, a comment, or a preprocessor line; found {code:?}",
                    at()
                )
            })?;
        if structs.iter().any(|s| s.name == name) {
            return Err(format!("{}: struct {name} defined twice", at()));
        }
        open = Some(Struct {
            name: name.to_string(),
            doc: std::mem::take(&mut doc),
            fields: Vec::new(),
        });
    }
    if let Some(s) = open {
        return Err(format!(
            "{file}: struct {} is not closed with `}};`",
            s.name
        ));
    }
    Ok(structs)
}

/// A kernel of a .cu file: `extern "C" __global__ void name(const Args a)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelDecl {
    pub name: String,
    pub args: String,
    /// The first argument of `__launch_bounds__` when it is a number (the
    /// largest block the kernel may be launched with), else 0.
    pub max_threads: u32,
}

/// Removes `//` and `/* */` comments (kernel sources have none in strings).
pub fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    loop {
        let line = rest.find("//");
        let block = rest.find("/*");
        match (line, block) {
            (Some(l), b) if b.is_none_or(|b| l < b) => {
                out.push_str(&rest[..l]);
                rest = rest[l..].find('\n').map_or("", |e| &rest[l + e..]);
            }
            (_, Some(b)) => {
                out.push_str(&rest[..b]);
                rest = rest[b..].find("*/").map_or("", |e| &rest[b + e + 2..]);
            }
            _ => {
                out.push_str(rest);
                return out;
            }
        }
    }
}

/// The `extern "C" __global__` kernels of a .cu source, each of which must
/// take exactly one parameter of a struct type by value.
pub fn parse_kernels(src: &str, file: &str) -> Result<Vec<KernelDecl>, String> {
    let code = strip_comments(src);
    let mut kernels = Vec::new();
    for (at, _) in code.match_indices("extern \"C\"") {
        let decl = &code[at..];
        let decl = &decl[..decl.find(['{', ';']).unwrap_or(decl.len())];
        if !decl.contains("__global__") {
            continue;
        }
        let mut decl = decl.to_string();
        let mut max_threads = 0;
        while let Some(lb) = decl.find("__launch_bounds__") {
            let close = decl[lb..].find(')').map_or(decl.len(), |c| lb + c + 1);
            if let Some(open) = decl[lb..close].find('(') {
                let first = decl[lb + open + 1..close - 1]
                    .split(',')
                    .next()
                    .unwrap_or("");
                max_threads = first.trim().parse().unwrap_or(0);
            }
            decl.replace_range(lb..close, " ");
        }
        let open = decl
            .find('(')
            .ok_or_else(|| format!("{file}: kernel declaration without parameters: {decl:?}"))?;
        let close = decl
            .rfind(')')
            .ok_or_else(|| format!("{file}: unclosed parameter list: {decl:?}"))?;
        let name = decl[..open]
            .trim_end()
            .rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .next()
            .unwrap_or("")
            .to_string();
        let params: Vec<&str> = decl[open + 1..close].split_whitespace().collect();
        let args = match params.as_slice() {
            ["const", ty, _] | [ty, _] | ["const", ty] | [ty] if is_ident(ty) => {
                ty.to_string()
            }
            _ => {
                return Err(format!(
                    "{file}: kernel {name} must take exactly one argument struct of abi.h by value, \
                     like `extern \"C\" __global__ void {name}(const {}Args a)`; its parameters are ({})",
                    camel(&name),
                    decl[open + 1..close].trim()
                ))
            }
        };
        kernels.push(KernelDecl {
            name,
            args,
            max_threads,
        });
    }
    Ok(kernels)
}

fn camel(snake: &str) -> String {
    snake
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The kernels of one module (a .cu file), checked against the structs.
#[derive(Debug, Clone)]
pub struct Module {
    /// The file stem, e.g. `rmsnorm`.
    pub name: String,
    pub kernels: Vec<KernelDecl>,
}

/// Checks that every kernel's argument type is one of `structs`.
pub fn check_kernels(modules: &[Module], structs: &[Struct]) -> Result<(), String> {
    let mut seen: Vec<&str> = Vec::new();
    for m in modules {
        for k in &m.kernels {
            if !structs.iter().any(|s| s.name == k.args) {
                return Err(format!(
                    "kernel {} ({}.cu) takes {}, which is not a struct of the ABI headers",
                    k.name, m.name, k.args
                ));
            }
            if seen.contains(&k.name.as_str()) {
                return Err(format!(
                    "kernel {} is declared twice (kernel names are global)",
                    k.name
                ));
            }
            seen.push(&k.name);
        }
    }
    Ok(())
}

fn doc_lines(out: &mut String, indent: &str, doc: &[String]) {
    for line in doc {
        let _ = writeln!(out, "{indent}/// {line}");
    }
}

/// The Rust mirror of `structs`: `#[repr(C)]` structs with a `Default` of
/// null pointers and zeros, compile-time layout checks, and `KernelArgs`.
/// `kernel_args` is the path of the `KernelArgs` trait.
pub fn rust_structs(structs: &[Struct], kernel_args: &str) -> String {
    let mut out = String::new();
    for s in structs {
        let layout = s.layout();
        doc_lines(&mut out, "", &s.doc);
        let _ = writeln!(
            out,
            "#[repr(C)]\n#[derive(Debug, Clone, Copy, PartialEq)]\n#[allow(non_snake_case)]\npub struct {} {{",
            s.name
        );
        for f in &s.fields {
            doc_lines(&mut out, "    ", &f.doc);
            let _ = writeln!(out, "    pub {}: {},", f.name, f.ty.rust());
        }
        out += "}\n";
        let _ = writeln!(
            out,
            "#[allow(clippy::derivable_impls)] // null pointers, zeros: one form for every struct\nimpl Default for {} {{",
            s.name
        );
        out += "    fn default() -> Self {\n        Self {\n";
        for f in &s.fields {
            let _ = writeln!(out, "            {}: {},", f.name, f.ty.rust_default());
        }
        out += "        }\n    }\n}\n";
        let _ = writeln!(out, "const _: () = {{");
        let _ = writeln!(
            out,
            "    assert!(::core::mem::size_of::<{0}>() == {1});\n    assert!(::core::mem::align_of::<{0}>() == {2});",
            s.name, layout.size, layout.align
        );
        for (f, off) in s.fields.iter().zip(&layout.offsets) {
            let _ = writeln!(
                out,
                "    assert!(::core::mem::offset_of!({}, {}) == {off});",
                s.name, f.name
            );
        }
        out += "};\n";
        let _ = writeln!(
            out,
            "// SAFETY: generated from the C declaration, layout checked above.\nunsafe impl {kernel_args} for {} {{}}\n",
            s.name
        );
    }
    out
}

/// One typed `Kernel` constant per kernel (`RMSNORM_FORWARD_BF16`), and
/// `ALL_KERNELS` listing (module, kernel, argument struct).
pub fn rust_kernels(modules: &[Module], kernel_type: &str) -> String {
    let mut out = String::new();
    let mut all = String::new();
    for m in modules {
        for k in &m.kernels {
            let _ = writeln!(
                out,
                "/// `{}` of `kernels/{}.cu`, taking [`{}`].\npub const {}: {kernel_type}<{}> = {kernel_type}::new({:?}, {:?});",
                k.name,
                m.name,
                k.args,
                k.name.to_ascii_uppercase(),
                k.args,
                m.name,
                k.name
            );
            let _ = writeln!(all, "    ({:?}, {:?}, {:?}),", m.name, k.name, k.args);
        }
    }
    let _ = writeln!(
        out,
        "/// Every kernel: (module, kernel, argument struct).\npub const ALL_KERNELS: &[(&str, &str, &str)] = &[\n{all}];"
    );
    out
}

/// The C++ side of the emulator entries: layout checks of `structs` and one
/// `TRM_EMU_ENTRY` per kernel. `includes` are the headers to include.
pub fn cpp_entries(includes: &[&str], structs: &[Struct], modules: &[Module]) -> String {
    let mut out = String::from(
        "// @generated by build.rs (src/backend/cuda/abigen.rs): emulator entry points.\n\
         #include <stddef.h>\n",
    );
    for inc in includes {
        let _ = writeln!(out, "#include \"{inc}\"");
    }
    for s in structs {
        let layout = s.layout();
        let _ = writeln!(
            out,
            "static_assert(sizeof({0}) == {1} && alignof({0}) == {2}, \"{0}: layout differs from the generator's\");",
            s.name, layout.size, layout.align
        );
        for (f, off) in s.fields.iter().zip(&layout.offsets) {
            let _ = writeln!(
                out,
                "static_assert(offsetof({0}, {1}) == {off}, \"{0}.{1}: offset differs from the generator's\");",
                s.name, f.name
            );
        }
    }
    for m in modules {
        for k in &m.kernels {
            let _ = writeln!(
                out,
                "extern \"C\" void {0}(const {1});\nTRM_EMU_ENTRY({0}, {1}, {2})",
                k.name, k.args, k.max_threads
            );
        }
    }
    out
}

/// The Rust declarations of the emulator entries and `entry(name)`, which
/// finds one by kernel name.
pub fn rust_entries(modules: &[Module]) -> String {
    let mut out = String::from("extern \"C\" {\n");
    for m in modules {
        for k in &m.kernels {
            let _ = writeln!(
                out,
                "    fn trm_emu_entry_{}(cfg: *const TrmEmuLaunch, args: *const ::core::ffi::c_void, err: *mut ::core::ffi::c_char, err_len: usize) -> ::core::ffi::c_int;",
                k.name
            );
        }
    }
    out += "}\n\n/// The emulator entry point of a kernel, by name.\npub(crate) fn entry(name: &str) -> Option<EntryFn> {\n    match name {\n";
    for m in modules {
        for k in &m.kernels {
            let _ = writeln!(
                out,
                "        {:?} => Some(trm_emu_entry_{}),",
                k.name, k.name
            );
        }
    }
    out += "        _ => None,\n    }\n}\n";
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = r#"
// Not a doc: followed by a blank line.

#pragma once
#include <stdint.h>
typedef __nv_bfloat16 bf16;
// ------------------------------------------------
// Scales x.
struct ScaleArgs {
    const bf16* x;   // [n] input
    float* y;
    // element count
    int64_t n;
    float s;
    bf16 v;
};
struct Pad {
    uint8_t a;
    double b;
    uint16_t c;
};
"#;

    #[test]
    fn parses_structs_fields_and_docs() {
        let structs = parse_header(HEADER, "t.h").unwrap();
        assert_eq!(structs.len(), 2);
        let s = &structs[0];
        assert_eq!(s.name, "ScaleArgs");
        assert_eq!(s.doc, ["Scales x."]);
        let names: Vec<&str> = s.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["x", "y", "n", "s", "v"]);
        assert_eq!(
            s.fields[0].ty,
            FieldType::Ptr {
                pointee: Scalar::Bf16,
                is_const: true
            }
        );
        assert_eq!(s.fields[0].doc, ["[n] input"]);
        assert_eq!(s.fields[2].doc, ["element count"]);
        assert_eq!(
            s.layout(),
            Layout {
                size: 32,
                align: 8,
                offsets: vec![0, 8, 16, 24, 28]
            }
        );
        assert_eq!(
            structs[1].layout(),
            Layout {
                size: 24,
                align: 8,
                offsets: vec![0, 8, 16]
            }
        );
    }

    #[test]
    fn rejects_what_it_cannot_mirror() {
        for (bad, needle) in [
            ("struct A {\n  float x, y;\n};", "one field per line"),
            ("struct A {\n  size_t n;\n};", "not one of"),
            ("struct A {\n  float** p;\n};", "one field per line"),
            ("struct A {\n  float x\n};", "expected a field"),
            ("struct A {\n  float x;\n", "not closed"),
            ("struct A {\n};", "no fields"),
            ("int x;", "expected `struct Name {`"),
            ("struct A {\n  void v;\n};", "only void*"),
        ] {
            let err = parse_header(bad, "t.h").unwrap_err();
            assert!(err.contains(needle), "{bad:?}: {err}");
            assert!(err.starts_with("t.h"), "{err}");
        }
    }

    #[test]
    fn finds_kernels_and_their_argument_struct() {
        let src = r#"
            // extern "C" __global__ void in_comment(const XArgs a);
            extern "C" __global__ void __launch_bounds__(256, 2) scale(const ScaleArgs a) { }
            extern "C" __device__ float helper(float x) { return x; }
            extern "C"
            __global__ void plain(ScaleArgs args) { }
        "#;
        let k = parse_kernels(src, "k.cu").unwrap();
        assert_eq!(
            k,
            [
                KernelDecl {
                    name: "scale".into(),
                    args: "ScaleArgs".into(),
                    max_threads: 256,
                },
                KernelDecl {
                    name: "plain".into(),
                    args: "ScaleArgs".into(),
                    max_threads: 0,
                }
            ]
        );
        let err = parse_kernels(
            r#"extern "C" __global__ void fill_f32(float* y, float v, long n) {}"#,
            "k.cu",
        )
        .unwrap_err();
        assert!(
            err.contains("exactly one argument struct") && err.contains("FillF32Args"),
            "{err}"
        );
    }

    #[test]
    fn kernels_must_use_known_structs_and_unique_names() {
        let structs = parse_header(HEADER, "t.h").unwrap();
        let module = |name: &str, args: &str| Module {
            name: "m".into(),
            kernels: vec![KernelDecl {
                name: name.into(),
                args: args.into(),
                max_threads: 0,
            }],
        };
        assert!(check_kernels(&[module("a", "ScaleArgs")], &structs).is_ok());
        let err = check_kernels(&[module("a", "Nope")], &structs).unwrap_err();
        assert!(err.contains("Nope"), "{err}");
        let err = check_kernels(
            &[module("a", "ScaleArgs"), module("a", "ScaleArgs")],
            &structs,
        )
        .unwrap_err();
        assert!(err.contains("twice"), "{err}");
    }

    #[test]
    fn generated_code_mentions_every_field_and_kernel() {
        let structs = parse_header(HEADER, "t.h").unwrap();
        let rust = rust_structs(&structs, "KernelArgs");
        assert!(rust.contains("pub x: *const ::half::bf16,"));
        assert!(rust.contains("pub y: *mut f32,"));
        assert!(rust.contains("offset_of!(ScaleArgs, v) == 28"));
        assert!(rust.contains("unsafe impl KernelArgs for Pad {}"));
        let modules = [Module {
            name: "scale".into(),
            kernels: vec![KernelDecl {
                name: "scale_bf16".into(),
                args: "ScaleArgs".into(),
                max_threads: 128,
            }],
        }];
        let k = rust_kernels(&modules, "Kernel");
        assert!(k.contains(
            "pub const SCALE_BF16: Kernel<ScaleArgs> = Kernel::new(\"scale\", \"scale_bf16\");"
        ));
        let cpp = cpp_entries(&["abi.h"], &structs, &modules);
        assert!(cpp.contains("static_assert(offsetof(ScaleArgs, v) == 28"));
        assert!(cpp.contains("TRM_EMU_ENTRY(scale_bf16, ScaleArgs, 128)"));
        assert!(rust_entries(&modules).contains("\"scale_bf16\" => Some(trm_emu_entry_scale_bf16)"));
    }
}
