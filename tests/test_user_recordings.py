"""A user's own recordings: WAV + CSV files described by a recording.toml manifest."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from edgefuse.runtime.cli import main
from edgefuse.runtime.core.errors import InputError
from edgefuse.sensors.readers import csvfile
from edgefuse.sensors.readers.inputs import open_inputs

MODEL = "models/bundled/bench_3m.onnx"  # modalities acoustic, seismic, imu (edgefuse info)
T0 = "2026-05-01T12:00:00.123456789Z"
T0_NS = 1777636800_123456789
IMU_T0_MS = 1777636800_000
SECONDS = 6


def write_wav(path, data: np.ndarray, rate: int) -> None:
    """A minimal RIFF/WAVE file: int16/int32 PCM or float32, any channel count."""
    data = np.ascontiguousarray(data if data.ndim == 2 else data[:, None])
    tag = 3 if data.dtype.kind == "f" else 1
    channels, width = data.shape[1], data.dtype.itemsize
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * channels * width,
                      channels * width, width * 8)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + \
        struct.pack("<I", data.nbytes) + data.astype(data.dtype.newbyteorder("<")).tobytes()
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def imu_stamps_ms() -> list[int]:
    """100 Hz with +-1 ms jitter (ends exact), and a 1 s gap after row 300."""
    rng = np.random.default_rng(1)
    first = [IMU_T0_MS + 10 * i + (int(rng.integers(-1, 2)) if 0 < i < 299 else 0)
             for i in range(300)]
    second = [IMU_T0_MS + 4000 + 10 * i for i in range(200)]
    return first + second


def write_node(folder, manifest_extra: str = "") -> None:
    rng = np.random.default_rng(0)
    write_wav(folder / "pi-a_acoustic.wav",
              (rng.standard_normal(16000 * SECONDS) * 3000).astype(np.int16), 16000)
    write_wav(folder / "pi-a_seismic.wav",
              (rng.standard_normal(500 * SECONDS) * 0.2).astype(np.float32), 500)
    lines = ["t_ms,ax,ay,az,gx,gy,gz"]
    for t in imu_stamps_ms():
        lines.append(f"{t}," + ",".join(f"{v:.4f}" for v in rng.standard_normal(6)))
    (folder / "pi-a_imu.csv").write_text("\n".join(lines) + "\n")
    (folder / "recording.toml").write_text(f"""
[[stream]]
node = "pi-a"
modality = "acoustic"
file = "pi-a_acoustic.wav"
t0 = "{T0}"

[[stream]]
node = "pi-a"
modality = "seismic"
file = "pi-a_seismic.wav"
t0_ns = {T0_NS + 250_000_000}
rate_hz = 500.02

[[stream]]
node = "pi-a"
modality = "imu"
file = "pi-a_imu.csv"
{manifest_extra}""")


@pytest.fixture
def node(tmp_path):
    folder = tmp_path / "node"
    folder.mkdir()
    write_node(folder)
    return folder


def test_manifest_streams_rates_and_exact_t0s(node):
    inputs = open_inputs(node)
    streams = {s.modality: s for s in inputs.streams}
    assert sorted(streams) == ["acoustic", "imu", "seismic"]
    assert (streams["acoustic"].t0_ns, streams["acoustic"].rate_hz,
            streams["acoustic"].channels, streams["acoustic"].samples) == \
        (T0_NS, 16000.0, 1, 16000 * SECONDS)
    assert streams["acoustic"].rate_is_nominal  # the header's rate, not a measured one
    assert (streams["seismic"].t0_ns, streams["seismic"].rate_hz) == (T0_NS + 250_000_000, 500.02)
    assert not streams["seismic"].rate_is_nominal
    assert (streams["imu"].t0_ns, streams["imu"].channels) == (IMU_T0_MS * 1_000_000, 6)
    chunks = list(inputs.chunks())
    assert [c.t0_ns for c in chunks] == sorted(c.t0_ns for c in chunks)
    by = {m: [c for c in chunks if c.modality == m] for m in streams}
    assert by["acoustic"][0].full_scale == 32767.0 and by["seismic"][0].full_scale == 1.0
    assert by["acoustic"][1].t0_ns == T0_NS + 1_000_000_000
    assert sum(c.n for c in by["acoustic"]) == 16000 * SECONDS
    imu = by["imu"]
    assert sum(c.n for c in imu) == 500 and all(c.channels == 6 for c in imu)
    # two runs (the gap), each timed from its first stamp at its estimated rate
    assert imu[0].t0_ns == IMU_T0_MS * 1_000_000 and imu[0].rate_hz == 100.0
    second = [c for c in imu if c.t0_ns >= (IMU_T0_MS + 4000) * 1_000_000]
    assert second[0].t0_ns == (IMU_T0_MS + 4000) * 1_000_000 and sum(c.n for c in second) == 200
    # seq skips the second lost between the runs (3 chunks, then 1 s missing): the
    # aligner's clock reads the hole as lost data, not as a clock step
    assert [c.seq for c in imu] == [0, 1, 2, 4, 5]


def test_the_manifest_path_itself_and_a_toml_name_work(node):
    a = [(c.modality, c.t0_ns, c.n) for c in open_inputs(node / "recording.toml").chunks()]
    b = [(c.modality, c.t0_ns, c.n) for c in open_inputs(node).chunks()]
    assert a == b


def test_csv_time_units_parse_exactly(tmp_path):
    for unit, text in [("t_ns", "1777636800123456789"), ("t_us", "1777636800123456.789"),
                       ("t_ms", "1777636800123.456789"), ("t_s", "1777636800.123456789"),
                       ("time", T0)]:
        p = tmp_path / f"{unit}.csv"
        p.write_text(f"{unit},x\n{text},1\n")
        layout = csvfile.scan(p, rate_hz=10.0)
        assert layout.t0_ns == T0_NS, unit
    for unit, text, expected in [("time", "1999-12-31T23:59:59Z", "outside the years"),
                                 ("t_ns", "1777636800", "look like t_s"),
                                 ("t_ms", "12x", "expected a time in t_ms")]:
        p = tmp_path / "bad.csv"
        p.write_text(f"{unit},x\n{text},1\n")
        with pytest.raises(InputError, match=f"bad.csv line 2: .*{expected}"):
            csvfile.scan(p, rate_hz=10.0)


def test_record_then_replay_equals_replay_of_the_folder(node, tmp_path, capsys):
    log = tmp_path / "x.mcap"
    assert main(["record", str(node), "-o", str(log)]) == 0
    direct, recorded = tmp_path / "direct.jsonl", tmp_path / "recorded.jsonl"
    assert main(["replay", str(node), "--model", MODEL, "-q", "--out", str(direct)]) == 0
    assert main(["replay", str(log), "--model", MODEL, "-q", "--out", str(recorded)]) == 0
    assert direct.read_bytes() == recorded.read_bytes()
    assert len(direct.read_bytes().splitlines()) > 5


def _cli_error(capsys, *argv) -> str:
    assert main(list(argv)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_manifests_and_csvs_are_one_line_errors(node, tmp_path, capsys):
    out = str(tmp_path / "bad.mcap")
    manifest = node / "recording.toml"
    good = manifest.read_text()

    manifest.write_text(good + 'channels = 6\n')
    line = _cli_error(capsys, "record", str(node), "-o", out)
    assert "stream 2 (pi-a/imu)" in line and "channels: unknown key" in line

    manifest.write_text(good.replace("pi-a_seismic.wav", "nope.wav"))
    line = _cli_error(capsys, "record", str(node), "-o", out)
    assert "stream 1 (pi-a/seismic): file:" in line and "nope.wav does not exist" in line

    manifest.write_text(good)
    csv_text = (node / "pi-a_imu.csv").read_text().splitlines()
    csv_text[10], csv_text[11] = csv_text[11], csv_text[10]  # file lines 11 and 12
    (node / "pi-a_imu.csv").write_text("\n".join(csv_text) + "\n")
    line = _cli_error(capsys, "replay", str(node), "--model", MODEL, "-q")
    assert "pi-a_imu.csv line 12: time goes backwards" in line

    (node / "pi-a_imu.csv").write_text("t_s,x\n1777636800123,1\n1777636800133,2\n")
    line = _cli_error(capsys, "record", str(node), "-o", out)
    assert "pi-a_imu.csv line 2" in line and "read as t_s" in line and "look like t_ms" in line


def test_bad_entries_name_the_stream_and_key(tmp_path):
    write_wav(tmp_path / "a.wav", np.zeros(10, np.int16), 100)
    (tmp_path / "x.csv").write_text("t_ms,x\n1777636800000,1\n")
    cases = [('file = "a.wav"', "t0: a WAV file needs its clock"),
             ('file = "a.wav"\nt0 = "2026-05-01 12:00"', "t0: expected a UTC time"),
             ('file = "a.wav"\nt0_ns = "1"', "t0_ns: expected an integer"),
             ('file = "a.wav"\nt0_ns = 1\nrate_hz = -3', "rate_hz: expected a positive"),
             ('file = "x.csv"\nt0_ns = 1', "t0_ns: a CSV carries its own time"),
             ('file = "x.csv"', "the rate cannot be estimated; give rate_hz")]
    for body, expected in cases:
        p = tmp_path / "m.toml"
        p.write_text(f'[[stream]]\nnode = "n"\nmodality = "m"\n{body}\n')
        with pytest.raises(InputError) as exc:
            open_inputs(p)
        assert expected in str(exc.value), (body, str(exc.value))
        assert "x.csv" in str(exc.value) or "stream 0 (n/m)" in str(exc.value)


def test_multichannel_int32_wav(tmp_path):
    data = (np.arange(40, dtype=np.int32).reshape(10, 4) * 1000)
    write_wav(tmp_path / "a.wav", data, 10)
    (tmp_path / "recording.toml").write_text(
        '[[stream]]\nnode = "n"\nmodality = "m"\nfile = "a.wav"\nt0_ns = 1777636800000000000\n')
    (chunk,) = open_inputs(tmp_path).chunks()
    assert chunk.channels == 4 and chunk.full_scale == 2147483647.0
    np.testing.assert_array_equal(chunk.samples, data.astype(np.float32))


def test_export_streams_reads_back(node, tmp_path):
    log, out = tmp_path / "x.mcap", tmp_path / "out"
    assert main(["record", str(node), "-o", str(log)]) == 0
    assert main(["export-streams", str(log), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == \
        ["pi-a_acoustic_000.wav", "pi-a_imu.csv", "pi-a_seismic.csv", "recording.toml"]
    before = list(open_inputs(log).chunks())
    after = list(open_inputs(out).chunks())
    for modality in ("acoustic", "seismic", "imu"):
        a = [c for c in before if c.modality == modality]
        b = [c for c in after if c.modality == modality]
        assert a[0].t0_ns == b[0].t0_ns and a[0].full_scale == b[0].full_scale, modality
        np.testing.assert_array_equal(np.concatenate([c.samples for c in a]),
                                      np.concatenate([c.samples for c in b]))
    # the audio-rate WAV comes back chunk for chunk
    def timing(chunks):
        return [(c.t0_ns, c.rate_hz, c.rate_is_nominal, c.n, c.seq) for c in chunks
                if c.modality == "acoustic"]
    assert timing(before) == timing(after)
    assert main(["export-streams", str(log), "-o", str(out)]) == 1  # never overwrites


def _imu_csv(path, stamps_ms, seed=0) -> None:
    rng = np.random.default_rng(seed)
    rows = [f"{t}," + ",".join(f"{v:.4f}" for v in rng.standard_normal(6)) for t in stamps_ms]
    path.write_text("t_ms,ax,ay,az,gx,gy,gz\n" + "\n".join(rows) + "\n")


def test_whole_millisecond_stamps_with_repeats_are_one_run(tmp_path):
    # a 104 Hz logger stamping whole ms: steps of 9, 10 and repeats are one clock
    stamps = (IMU_T0_MS + np.floor(np.arange(2000) * (1000 / 104.0))).astype(np.int64)
    stamps[500] = stamps[499]           # a repeated stamp
    _imu_csv(tmp_path / "imu.csv", stamps)
    layout = csvfile.scan(tmp_path / "imu.csv")
    assert len(layout.runs) == 1
    assert layout.runs[0].rate_hz == pytest.approx(104.0, rel=1e-3)


def _aligner_clock_steps(chunks) -> int:
    from edgefuse.runtime.core.aligner import Aligner
    from edgefuse.runtime.core.contract import ModalitySpec, ModelContract
    contract = ModelContract("t", "0", (ModalitySpec("imu", 6, 50.0, "imu"),),
                             1_000_000_000, 500_000_000, ("a", "b"),
                             "modality_mask", "scores", "logits")
    aligner = Aligner(contract)
    for c in chunks:
        aligner.push(c)
    aligner.flush()
    return sum(s["clock_steps"] for s in aligner.stats()["streams"].values())


def test_silence_between_files_and_csv_runs_is_a_gap_not_a_clock_step(tmp_path):
    # one stream in two files 30 s apart, the first with a 5 s hole of its own
    first = np.r_[np.arange(0, 3000, 10), np.arange(8000, 12000, 10)] + IMU_T0_MS
    second = np.arange(42000, 50000, 10) + IMU_T0_MS
    _imu_csv(tmp_path / "a.csv", first)
    _imu_csv(tmp_path / "b.csv", second, seed=1)
    (tmp_path / "recording.toml").write_text(
        '[[stream]]\nnode = "n1"\nmodality = "imu"\nfile = "a.csv"\n\n'
        '[[stream]]\nnode = "n1"\nmodality = "imu"\nfile = "b.csv"\n')
    a = list(open_inputs(tmp_path).chunks())
    seqs = [c.seq for c in a]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # 3 chunks, 5 s lost, 4 chunks, 30 s lost, 8 chunks (1 s chunks)
    assert seqs == [0, 1, 2, *range(8, 12), *range(42, 50)]
    assert _aligner_clock_steps(a) == 0
    # a real step (labels jump, seq runs on) is still one
    stepped = [c if c.seq < 3 else type(c)(c.node, c.modality, c.t0_ns + 7_000_000_000,
                                            c.rate_hz, c.samples, c.seq - 5)
               for c in a[:7]]
    assert _aligner_clock_steps(stepped) == 1


def test_a_folder_of_node_folders_with_manifests_reads_every_node(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_node(tmp_path / name)
        text = (tmp_path / name / "recording.toml").read_text()
        (tmp_path / name / "recording.toml").write_text(text.replace('"pi-a"', f'"pi-{name}"'))
    streams = open_inputs(tmp_path).streams
    assert sorted({s.node for s in streams}) == ["pi-a", "pi-b"] and len(streams) == 6
