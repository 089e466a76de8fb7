"""Write a bf16 GGUF of a quantized GGUF's weights, for llama.cpp at tgq's precision.

tgq serves `smollm2` by dequantizing the shipped Q4_1/Q8_0 GGUF to fp32 and casting to bf16. The
same tensors, written back as a BF16 GGUF (1-D norm weights stay F32, as llama.cpp's converter keeps
them), give llama.cpp exactly the weights tgq runs, so the bf16 comparison is like for like. No
Hugging Face checkpoint or llama.cpp conversion script is needed: metadata is copied field by field
with the `gguf` package (only `general.file_type` changes).

    python -m bench.gguf_bf16 SRC.gguf DST.gguf
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def convert_to_bf16(src: Path, dst: Path) -> Path:
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
    from gguf.quants import dequantize, quantize

    reader = GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    tmp = dst.with_name(dst.name + f".tmp-{os.getpid()}")
    writer = GGUFWriter(str(tmp), arch)
    for name, fld in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # written by the writer itself
        if name == "general.file_type":
            writer.add_key_value(name, int(LlamaFileType.MOSTLY_BF16), GGUFValueType.UINT32)
            continue
        vtype = fld.types[0]
        if vtype == GGUFValueType.ARRAY:
            writer.add_key_value(name, fld.contents(), vtype, sub_type=fld.types[-1])
        else:
            writer.add_key_value(name, fld.contents(), vtype)
    for t in reader.tensors:
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) and len(t.shape) == 1:
            writer.add_tensor(t.name, np.asarray(t.data, dtype=np.float32))
            continue
        weights = dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, quantize(weights, GGMLQuantizationType.BF16), raw_dtype=GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)
    return dst


def bf16_gguf_for(src: Path, cache_dir: Path) -> Path:
    """The bf16 copy of `src` in `cache_dir` (made once)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    dst = cache_dir / (src.stem.split(".")[0] + f"-{src.stat().st_size}.bf16.gguf")
    if not dst.is_file():
        convert_to_bf16(src, dst)
    return dst


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(convert_to_bf16(Path(sys.argv[1]), Path(sys.argv[2])))
