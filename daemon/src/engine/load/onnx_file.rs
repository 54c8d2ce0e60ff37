//! Reads `model.onnx` into a tract model while about one copy of its weights is resident.
//!
//! tract-onnx's own `model_for_path` maps the file, decodes the whole protobuf from it (a copy
//! of every weight: its `raw_data` fields are `Vec<u8>`), then makes a tract tensor of every
//! initializer (another copy) before the protobuf is dropped, so the weights were resident
//! twice at that step.
//!
//! Here the file is decoded through a window that slides over it ([`FileWindow`]), 4-bit
//! weights are converted and their ONNX bytes freed one by one ([`matmul_nbits`]), and each
//! other initializer's bytes are moved out of the protobuf and handed to tract one tensor at a
//! time ([`MovedWeights`]), each freed once its tensor is made. What is resident at most is the
//! weights once, plus the largest tensor once more while it is copied. Peak RSS in `mulmd
//! probe`, release build, with this reader alone: mulm-28m f32 243 → 220 MB, SmolLM2-135M f32
//! 1079 → 882 MB ([`super::heap`] and [`matmul_nbits`] take them further).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use bytes::Buf;
use prost::Message;
use tract_onnx::data_resolver::{MmapDataResolver, ModelDataResolver};
use tract_onnx::pb::{tensor_proto::DataLocation, ModelProto, StringStringEntryProto};
use tract_onnx::prelude::*;

use super::matmul_nbits;

/// Bytes read from the file per refill of the window.
const WINDOW: usize = 1 << 20;

/// The ONNX file at `path` as a tract inference model; the same model `model_for_path` makes.
pub fn read_onnx(path: &Path) -> TractResult<InferenceModel> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    // tract takes the directory external data is resolved against as a `&str`. A path that is
    // not UTF-8 loads through tract's own reader, at its higher peak.
    let Some(dir_str) = dir.to_str() else { return tract_onnx::onnx().model_for_path(path) };
    let mut proto = decode(path)?;
    let (converted, _pending) = matmul_nbits::convert(&mut proto)?;
    tracing::debug!(converted, "MatMulNBits weights converted to block-quant constants while reading");
    let blobs = move_weights_out(&mut proto);
    let dir = dir.canonicalize().with_context(|| format!("Resolving the model directory {dir:?}"))?;
    let mut onnx = tract_onnx::onnx();
    onnx.provider = Arc::new(MovedWeights { dir, blobs: Mutex::new(blobs) });
    matmul_nbits::register(&mut onnx.op_register);
    let parsed = onnx.parse(&proto, Some(dir_str))?;
    if !parsed.unresolved_inputs.is_empty() {
        bail!("Could not resolve inputs at top-level: {:?}", parsed.unresolved_inputs)
    }
    Ok(parsed.model)
}

/// Decodes the protobuf, holding only [`WINDOW`] bytes of the file at a time.
fn decode(path: &Path) -> TractResult<ModelProto> {
    let file = File::open(path).with_context(|| format!("Opening {path:?}"))?;
    let mut window = FileWindow::new(file)?;
    let decoded = ModelProto::decode(&mut window);
    // A read error ends the window early, which the decoder reports as truncated input; the
    // read error is the one that says what went wrong.
    if let Some(e) = window.error.take() {
        return Err(anyhow::Error::from(e).context(format!("Reading {path:?}")));
    }
    Ok(decoded.with_context(|| format!("Decoding {path:?} as an ONNX protobuf"))?)
}

/// Where tract looks for a moved initializer: the model directory itself. tract accepts it as
/// an external-data location (a path inside the directory that exists), and no real external
/// data can live at a directory, so [`MovedWeights`] can tell its own entries apart.
const MOVED_LOCATION: &str = ".";

/// Takes every top-level initializer's `raw_data` out of the protobuf, keyed by the initializer's
/// index, and marks it as external data at [`MOVED_LOCATION`] with that index as its offset.
fn move_weights_out(proto: &mut ModelProto) -> HashMap<usize, Vec<u8>> {
    let mut blobs = HashMap::new();
    let Some(graph) = proto.graph.as_mut() else { return blobs };
    for (index, tensor) in graph.initializer.iter_mut().enumerate() {
        if tensor.raw_data.is_empty() {
            continue;
        }
        let bytes = std::mem::take(&mut tensor.raw_data);
        let entry = |key: &str, value: String| StringStringEntryProto { key: key.into(), value };
        tensor.data_location = Some(DataLocation::External as i32);
        tensor.external_data = vec![
            entry("location", MOVED_LOCATION.into()),
            entry("offset", index.to_string()),
            entry("length", bytes.len().to_string()),
        ];
        blobs.insert(index, bytes);
    }
    blobs
}

/// tract's source of external tensor data: the moved initializers, each handed over once, and
/// any real external-data file through tract's own resolver.
struct MovedWeights {
    /// The canonical model directory: the path tract resolves [`MOVED_LOCATION`] to.
    dir: PathBuf,
    blobs: Mutex<HashMap<usize, Vec<u8>>>,
}

impl ModelDataResolver for MovedWeights {
    fn read_bytes_from_path(&self, buf: &mut Vec<u8>, p: &Path, offset: usize, length: Option<usize>) -> TractResult<()> {
        if p != self.dir {
            return MmapDataResolver.read_bytes_from_path(buf, p, offset, length);
        }
        let bytes = self.blobs.lock().unwrap_or_else(|e| e.into_inner()).remove(&offset);
        let bytes = bytes.with_context(|| format!("initializer {offset} was read twice or never moved"))?;
        if buf.is_empty() {
            *buf = bytes;
        } else {
            buf.extend_from_slice(&bytes);
        }
        Ok(())
    }
}

/// A [`Buf`] over a file that holds one window of it at a time.
///
/// A read error cannot pass through `Buf`; it ends the buffer (nothing remains) and is kept in
/// `error` for the caller.
struct FileWindow {
    file: File,
    window: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes of the file not yet read into the window.
    unread: usize,
    error: Option<io::Error>,
}

impl FileWindow {
    fn new(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        let unread = usize::try_from(len).map_err(|_| io::Error::other("the file is larger than memory"))?;
        let mut window = FileWindow { file, window: vec![0; WINDOW], start: 0, end: 0, unread, error: None };
        window.refill();
        Ok(window)
    }

    /// Reads the next part of the file into the emptied window.
    fn refill(&mut self) {
        self.start = 0;
        self.end = 0;
        if self.unread == 0 {
            return;
        }
        let want = self.unread.min(self.window.len());
        match self.file.read(&mut self.window[..want]) {
            Ok(0) => self.fail(io::Error::new(io::ErrorKind::UnexpectedEof, "the file shrank while it was read")),
            Ok(n) => {
                self.end = n;
                self.unread -= n;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => self.refill(),
            Err(e) => self.fail(e),
        }
    }

    fn fail(&mut self, e: io::Error) {
        self.error = Some(e);
        self.unread = 0;
    }
}

impl Buf for FileWindow {
    fn remaining(&self) -> usize {
        self.end - self.start + self.unread
    }

    fn chunk(&self) -> &[u8] {
        &self.window[self.start..self.end]
    }

    fn advance(&mut self, mut cnt: usize) {
        // prost skips unknown fields with one `advance`, which may reach past the window.
        while cnt > 0 && self.remaining() > 0 {
            let step = cnt.min(self.end - self.start);
            self.start += step;
            cnt -= step;
            if self.start == self.end {
                self.refill();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::pb::{
        attribute_proto, tensor_proto, tensor_shape_proto, type_proto, AttributeProto, GraphProto, NodeProto,
        OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
    };

    fn value_info(name: &str, dims: &[i64]) -> ValueInfoProto {
        let dim = |n| tensor_shape_proto::Dimension { value: Some(tensor_shape_proto::dimension::Value::DimValue(n)), ..Default::default() };
        let tensor = type_proto::Tensor {
            elem_type: tensor_proto::DataType::Float as i32,
            shape: Some(TensorShapeProto { dim: dims.iter().map(|&n| dim(n)).collect() }),
        };
        let ty = TypeProto { value: Some(type_proto::Value::TensorType(tensor)), ..Default::default() };
        ValueInfoProto { name: name.into(), r#type: Some(ty), ..Default::default() }
    }

    fn model(graph: GraphProto, opset: Vec<OperatorSetIdProto>) -> ModelProto {
        ModelProto { ir_version: 8, opset_import: opset, graph: Some(graph), ..Default::default() }
    }

    fn opset(domain: &str, version: i64) -> OperatorSetIdProto {
        OperatorSetIdProto { domain: domain.into(), version }
    }

    fn weight(name: &str, values: &[f32]) -> TensorProto {
        TensorProto {
            name: name.into(),
            dims: vec![2, 3],
            data_type: tensor_proto::DataType::Float as i32,
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        }
    }

    /// y = x + a + b: `a` inside the file, `b` in the file or in an external-data file beside it.
    fn write_model(dir: &Path, b_external: bool) -> PathBuf {
        let a = weight("a", &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let mut b = weight("b", &[0.5, -0.5, 0.25, -0.25, 8.0, -8.0]);
        if b_external {
            std::fs::write(dir.join("b.bin"), std::mem::take(&mut b.raw_data)).unwrap();
            b.data_location = Some(DataLocation::External as i32);
            b.external_data = vec![StringStringEntryProto { key: "location".into(), value: "b.bin".into() }];
        }
        let add = |i: &str, w: &str, o: &str| NodeProto {
            op_type: "Add".into(),
            input: vec![i.into(), w.into()],
            output: vec![o.into()],
            ..Default::default()
        };
        let graph = GraphProto {
            node: vec![add("x", "a", "xa"), add("xa", "b", "y")],
            initializer: vec![a, b],
            input: vec![value_info("x", &[2, 3])],
            output: vec![value_info("y", &[2, 3])],
            ..Default::default()
        };
        let path = dir.join("model.onnx");
        std::fs::write(&path, model(graph, vec![opset("", 17)]).encode_to_vec()).unwrap();
        path
    }

    fn run(model: InferenceModel, x: Tensor) -> Vec<f32> {
        let plan = model.into_optimized().unwrap().into_runnable().unwrap();
        let y = plan.run(tvec!(x.into())).unwrap();
        y[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
    }

    fn add_input() -> Tensor {
        tensor2(&[[10f32, 20., 30.], [40., 50., 60.]])
    }

    #[test]
    fn the_model_read_is_the_one_tract_reads_itself() {
        for b_external in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = write_model(dir.path(), b_external);
            let ours = run(read_onnx(&path).unwrap(), add_input());
            let tracts = run(tract_onnx::onnx().model_for_path(&path).unwrap(), add_input());
            assert_eq!(ours, vec![11.5, 21.5, 33.25, 43.75, 63.0, 58.0], "b external: {b_external}");
            assert_eq!(ours, tracts);
        }
    }

    /// `y = x · Wᵀ` as a `bits`-bit MatMulNBits of N = 8, K = 64 (blocks of 32), with zero
    /// points when `zero_points` (which mulmd leaves to tract-onnx at 4 bits), and with the
    /// block offsets' nodes mulm-export writes for a weight kept in Q4_1 when `offsets`.
    /// Returns the file and the float weight `[N, K]` the codes stand for.
    fn write_nbits_model(dir: &Path, bits: usize, zero_points: bool, offsets: bool) -> (PathBuf, Vec<f32>) {
        let (n, k) = (8usize, 64usize);
        let codes: Vec<u8> = (0..n * k * bits / 8).map(|i| (i * 37 % 256) as u8).collect();
        let scales: Vec<f32> = (0..n * k / 32).map(|i| 0.01 + i as f32 * 0.003).collect();
        let offset = |row: usize, block: usize| 0.05 * (row as f32 - 3.5) + 0.02 * block as f32;
        let dense: Vec<f32> = (0..n * k)
            .map(|i| {
                let (row, col) = (i / k, i % k);
                let (block, at) = (col / 32, col % 32);
                let code = if bits == 8 {
                    codes[row * k + col] as i32 - 128
                } else {
                    let byte = codes[(row * k + block * 32) / 2 + at / 2];
                    (if at % 2 == 0 { byte & 0x0f } else { byte >> 4 }) as i32 - 8
                };
                code as f32 * scales[row * (k / 32) + block] + if offsets { offset(row, block) } else { 0.0 }
            })
            .collect();
        let init = |name: &str, dims: Vec<i64>, ty: tensor_proto::DataType, raw: Vec<u8>| TensorProto {
            name: name.into(),
            dims,
            data_type: ty as i32,
            raw_data: raw,
            ..Default::default()
        };
        let mut initializer = vec![
            init("codes", vec![n as i64, (k / 32) as i64, (32 * bits / 8) as i64], tensor_proto::DataType::Uint8, codes),
            init("scales", vec![(n * k / 32) as i64], tensor_proto::DataType::Float, scales.iter().flat_map(|s| s.to_le_bytes()).collect()),
        ];
        let mut input = vec!["x".to_string(), "codes".into(), "scales".into()];
        if zero_points {
            initializer.push(init("zp", vec![(n * k / 64) as i64], tensor_proto::DataType::Uint8, vec![0x79; n * k / 64]));
            input.push("zp".into());
        }
        let int = |name: &str, i: i64| AttributeProto {
            name: name.into(),
            r#type: attribute_proto::AttributeType::Int as i32,
            i,
            ..Default::default()
        };
        let product = if offsets { "product_y" } else { "y" };
        let node = NodeProto {
            op_type: "MatMulNBits".into(),
            domain: "com.microsoft".into(),
            name: "product".into(),
            input,
            output: vec![product.into()],
            attribute: vec![int("K", k as i64), int("N", n as i64), int("bits", bits as i64), int("block_size", 32)],
            ..Default::default()
        };
        let mut nodes = vec![node];
        if offsets {
            let ints = |name: &str, values: &[i64]| {
                init(name, vec![values.len() as i64], tensor_proto::DataType::Int64, values.iter().flat_map(|v| v.to_le_bytes()).collect())
            };
            initializer.push(ints("shape", &[0, 0, -1, 32]));
            initializer.push(ints("axes", &[-1]));
            // [K/32, N], as the MatMul reads it.
            let c: Vec<u8> = (0..k / 32).flat_map(|b| (0..n).map(move |j| offset(j, b))).flat_map(|v| v.to_le_bytes()).collect();
            initializer.push(init("offsets", vec![(k / 32) as i64, n as i64], tensor_proto::DataType::Float, c));
            let op = |op_type: &str, input: &[&str], output: &str, attribute: Vec<AttributeProto>| NodeProto {
                op_type: op_type.into(),
                input: input.iter().map(|i| i.to_string()).collect(),
                output: vec![output.into()],
                attribute,
                ..Default::default()
            };
            nodes.push(op("Reshape", &["x", "shape"], "blocks", vec![]));
            nodes.push(op("ReduceSum", &["blocks", "axes"], "sums", vec![int("keepdims", 0)]));
            nodes.push(op("MatMul", &["sums", "offsets"], "term", vec![]));
            nodes.push(op("Add", &[product, "term"], "y", vec![]));
        }
        let graph = GraphProto {
            node: nodes,
            initializer,
            input: vec![value_info("x", &[1, 3, k as i64])],
            output: vec![value_info("y", &[1, 3, n as i64])],
            ..Default::default()
        };
        let path = dir.join("model.onnx");
        std::fs::write(&path, model(graph, vec![opset("", 17), opset("com.microsoft", 1)]).encode_to_vec()).unwrap();
        (path, dense)
    }

    fn nbits_input() -> Tensor {
        Tensor::from_shape(&[1, 3, 64], &(0..192).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>()).unwrap()
    }

    fn converted(model: &InferenceModel) -> bool {
        model.nodes().iter().any(|n| n.op.name() == "MatMulBlockQuant")
    }

    #[test]
    fn a_4_bit_product_converted_while_reading_computes_what_tracts_own_does() {
        let x = nbits_input();
        for zero_points in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (path, _) = write_nbits_model(dir.path(), 4, zero_points, false);
            let ours = read_onnx(&path).unwrap();
            assert_eq!(converted(&ours), !zero_points, "only a weight Q4_0 holds exactly is converted");
            let ours = run(ours, x.clone());
            let tracts = run(tract_onnx::onnx().model_for_path(&path).unwrap(), x.clone());
            assert_eq!(ours.len(), 24);
            assert!(ours.iter().any(|v| *v != 0.0));
            assert_eq!(ours, tracts, "zero points: {zero_points}");
        }
    }

    /// tract-onnx has no 8-bit MatMulNBits, and tract no CPU kernel for a Q8_1 product:
    /// converted while reading and put on the engine's kernels, the product is the float
    /// weight's, up to the int8 rounding of the activation (half a step of each block's scale).
    #[test]
    fn an_8_bit_product_converted_while_reading_computes_the_weight_it_stands_for() {
        let x = nbits_input();
        let dir = tempfile::tempdir().unwrap();
        let (path, dense) = write_nbits_model(dir.path(), 8, false, false);
        let ours = read_onnx(&path).unwrap();
        assert!(converted(&ours));
        let got = run_on_engine_kernels(ours, &x, |_| ());
        let x = x.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
        assert_eq!(got.len(), 24);
        for (i, g) in got.iter().enumerate() {
            let (r, j) = (i / 8, i % 8);
            let want: f32 = (0..64).map(|c| x[r * 64 + c] * dense[j * 64 + c]).sum();
            let bound = int8_rounding_bound(&x[r * 64..][..64], |c| dense[j * 64 + c]);
            assert!((g - want).abs() <= bound + 1e-5, "y[{r}, {j}] = {g}, the weight gives {want} (bound {bound})");
        }
    }

    /// `model` with its one quantized product put on the engine's kernels (`check` sees the
    /// rewritten graph), run on `x`.
    fn run_on_engine_kernels(model: InferenceModel, x: &Tensor, check: impl Fn(&TypedModel)) -> Vec<f32> {
        let mut typed = model.into_typed().unwrap().into_decluttered().unwrap();
        assert_eq!(crate::engine::ops::quantized::use_quantized_products(&mut typed).unwrap(), 1);
        check(&typed);
        let plan = typed.into_optimized().unwrap().into_runnable().unwrap();
        plan.run(tvec!(x.clone().into())).unwrap()[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
    }

    /// What the int8 rounding of activation row `x` (half a step of each block's scale) can
    /// move its product with weights `w(input)` by.
    fn int8_rounding_bound(x: &[f32], w: impl Fn(usize) -> f32) -> f32 {
        (0..x.len())
            .map(|c| {
                let block_max = x[c / 32 * 32..][..32].iter().fold(0f32, |m, v| m.max(v.abs()));
                w(c).abs() * block_max / 127.0 * 0.5
            })
            .sum()
    }

    /// A 4-bit weight kept in GGML's Q4_1: the block offsets' four nodes are taken out and
    /// the offsets go to the engine's product, which then gives the float weight's product
    /// (codes' part on the integer kernels, within their activation rounding), as tract
    /// computes from the file unconverted.
    #[test]
    fn a_q4_1_weights_block_offsets_fold_into_the_converted_product() {
        let x = nbits_input();
        let dir = tempfile::tempdir().unwrap();
        let (path, dense) = write_nbits_model(dir.path(), 4, false, true);
        let ours = read_onnx(&path).unwrap();
        assert!(converted(&ours));
        let names: Vec<String> = ours.nodes().iter().map(|n| n.op.name().to_string()).collect();
        assert!(!names.iter().any(|n| n.contains("Reduce") || n == "Reshape" || n == "Add"), "the tail should be taken out: {names:?}");
        let got = run_on_engine_kernels(ours, &x, |typed| {
            let product = typed.nodes().iter().find(|n| n.op.name() == "QuantizedMatMul").unwrap();
            assert!(product.op.info().unwrap()[0].starts_with("Q4_1"), "the product carries the offsets: {:?}", product.op.info());
        });
        let tracts = run(tract_onnx::onnx().model_for_path(&path).unwrap(), x.clone());
        let x = x.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
        assert_eq!(got.len(), 24);
        for (i, (g, t)) in got.iter().zip(&tracts).enumerate() {
            let (r, j) = (i / 8, i % 8);
            let want: f32 = (0..64).map(|c| x[r * 64 + c] * dense[j * 64 + c]).sum();
            // The codes' part (weight minus offset) meets the activation's int8 rounding.
            let offset = |c: usize| 0.05 * (j as f32 - 3.5) + 0.02 * (c / 32) as f32;
            let bound = int8_rounding_bound(&x[r * 64..][..64], |c| dense[j * 64 + c] - offset(c));
            assert!((g - want).abs() <= bound + 1e-5, "y[{r}, {j}] = {g}, the weight gives {want} (bound {bound})");
            assert!((g - t).abs() <= bound + 1e-5, "y[{r}, {j}] = {g}, tract's own graph gives {t}");
        }
    }

    /// An 8-bit product mulmd cannot take (here, with zero points) stops the load with what
    /// mulmd does take and how to get it, not tract-onnx's "only 2 and 4 bits".
    #[test]
    fn an_8_bit_product_mulmd_cannot_run_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write_nbits_model(dir.path(), 8, true, false);
        let err = format!("{:#}", read_onnx(&path).unwrap_err());
        assert!(err.contains("product") && err.contains("blocks of 32") && err.contains("--precision q8"), "{err}");
    }

    #[test]
    fn a_truncated_file_is_an_error_that_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_model(dir.path(), false);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 20]).unwrap();
        let e = format!("{:#}", read_onnx(&path).unwrap_err());
        assert!(e.contains("model.onnx") && e.contains("Decoding"), "{e}");
    }

    #[test]
    fn the_window_yields_the_whole_file_across_refills() {
        let bytes: Vec<u8> = (0..WINDOW * 2 + 12345).map(|i| (i * 7 % 251) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.bin");
        std::fs::write(&path, &bytes).unwrap();
        let mut window = FileWindow::new(File::open(&path).unwrap()).unwrap();
        assert_eq!(window.remaining(), bytes.len());
        let head = window.copy_to_bytes(1000);
        // One skip across two windows, as prost skips an unknown field.
        let skip = WINDOW + 500;
        window.advance(skip);
        let mut tail = Vec::new();
        while window.has_remaining() {
            let n = window.chunk().len().min(777);
            tail.extend_from_slice(&window.chunk()[..n]);
            window.advance(n);
        }
        assert_eq!(&head[..], &bytes[..1000]);
        assert_eq!(tail, &bytes[1000 + skip..]);
        assert!(window.error.is_none());
    }
}
