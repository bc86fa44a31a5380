"""What cow-apply reads at every start without pyelftools: this kernel's vDSO symbols (a small
ELF reader, compared with pyelftools here) and the restorer blob (kept after the first parse)."""

import io
import subprocess
import sys

from elftools.elf.elffile import ELFFile

from stages.apply import restorer
from stages.linux import vdso


def test_vdso_symbols_are_pyelftools_ones():
    blob = vdso.own_vdso_bytes()
    dynsym = ELFFile(io.BytesIO(blob)).get_section_by_name(".dynsym")
    want = [[s.name, s["st_value"]] for s in dynsym.iter_symbols() if s.name]
    assert want and vdso.symbols(blob) == want


def test_restorer_blob_kept_is_the_parsed_one_and_only_for_that_object(tmp_path):
    with open(restorer.object_path(), "rb") as f:
        data = f.read()
    parsed = restorer.Blob.from_object(data)
    kept = tmp_path / "restorer.o.blob"
    digest = restorer.sha256(data).digest()
    restorer._save(str(kept), digest, parsed)
    again = restorer._cached(str(kept), digest)
    assert (again.code, again.entry) == (parsed.code, parsed.entry)
    assert restorer._cached(str(kept), bytes(32)) is None  # another object: parsed anew
    kept.write_bytes(kept.read_bytes()[:20])
    assert restorer._cached(str(kept), digest) is None


def test_cow_apply_starts_without_pyelftools():
    restorer.load()  # the blob is kept now, if it was not
    code = ("import sys; from stages.apply import cli, check, restore; from stages.apply.check import vdso_mod; "
            "vdso_mod.own_identity(); restore.restorer.load(); print('elftools' in ' '.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
