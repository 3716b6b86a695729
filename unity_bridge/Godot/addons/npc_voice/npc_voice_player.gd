# npc_voice_player.gd: plays an npc-voice answer as it streams in, through AudioStreamGenerator.push_buffer (Godot 3).
#
# Add it as a child (it is an AudioStreamPlayer; for positional sound change `extends` to AudioStreamPlayer3D),
# point `client_path` at an npc_voice_client.gd node, then call ask() or
# ask_text(). The s16le mono PCM from the server is resampled (linear) to the generator's mix rate and pushed as
# stereo Vector2 frames. Signals: subtitle(text), answer_played(end) once the answer has been heard to the end.
extends AudioStreamPlayer

signal subtitle(text)
signal answer_played(end)

export(NodePath) var client_path
export(String) var npc_id = "innkeeper"
export(String) var session_id = ""
export(float) var buffer_seconds = 0.5

var client = null
var current_id = -1
var mix_rate = 44100.0

var frames_queued = 0  # resampled frames produced for the current answer
var frames_pushed = 0  # of those, frames handed to the generator

var _playback: AudioStreamGeneratorPlayback = null
var _pieces = []  # PoolVector2Array pieces waiting for room in the generator
var _carry = []  # source samples not yet consumed by the resampler
var _pos = 0.0  # resampler read position in _carry, in source samples
var _pending_end = null

const PIECE_FRAMES = 512


func _ready() -> void:
	var gen = AudioStreamGenerator.new()
	gen.mix_rate = AudioServer.get_mix_rate()
	gen.buffer_length = buffer_seconds
	stream = gen
	mix_rate = gen.mix_rate
	play()
	_playback = get_stream_playback()
	if client_path:
		attach(get_node(client_path))


func attach(npc_client) -> void:
	client = npc_client
	client.connect("subtitle", self, "_on_subtitle")
	client.connect("audio_chunk", self, "_on_audio")
	client.connect("answer_finished", self, "_on_finished")


# Ask with a recording: pcm s16le mono at sample_rate (or a whole wav file with encoding "wav").
func ask(audio: PoolByteArray, sample_rate: int = 16000, encoding: String = "pcm_s16le", extra: Dictionary = {}) -> int:
	var config = {"npc_id": npc_id, "session_id": session_id, "encoding": encoding}
	if encoding == "pcm_s16le":
		config["sample_rate"] = sample_rate
	for k in extra:
		config[k] = extra[k]
	cancel()
	current_id = client.speak(config, audio)
	return current_id


func ask_text(text: String, extra: Dictionary = {}) -> int:
	var config = {"npc_id": npc_id, "session_id": session_id, "text": text}
	for k in extra:
		config[k] = extra[k]
	cancel()
	current_id = client.speak(config)
	return current_id


# Interrupt the NPC: silence now, and the server stops the answer (answer_finished comes with interrupted = true).
func cancel() -> void:
	if current_id >= 0 and client != null:
		client.cancel(current_id)
	current_id = -1
	clear()


func clear() -> void:
	_pieces.clear()
	_carry = []
	_pos = 0.0
	_pending_end = null
	frames_queued = 0
	frames_pushed = 0
	if _playback != null and _playback.get_frames_available() < int(buffer_seconds * mix_rate) - 1:
		stop()  # the generator's buffer can only be cleared while it is not playing
		_playback.clear_buffer()
		play()
		_playback = get_stream_playback()


func pending_frames() -> int:
	var n = 0
	for p in _pieces:
		n += p.size()
	return n


# Append s16le mono PCM at sample_rate: resample to mix_rate, queue as stereo frames.
func push_pcm(pcm: PoolByteArray, sample_rate: int) -> void:
	var buf = StreamPeerBuffer.new()
	buf.data_array = pcm
	var n = pcm.size() / 2
	for i in range(n):
		_carry.append(buf.get_16() / 32768.0)
	var step = float(sample_rate) / mix_rate
	var out = PoolVector2Array()
	var pos = _pos
	var size = _carry.size()
	while pos + 1.0 < size:
		var i = int(pos)
		var t = pos - i
		var v = _carry[i] + (_carry[i + 1] - _carry[i]) * t
		out.append(Vector2(v, v))
		if out.size() == PIECE_FRAMES:
			_pieces.append(out)
			frames_queued += out.size()
			out = PoolVector2Array()
		pos += step
	if out.size() > 0:
		_pieces.append(out)
		frames_queued += out.size()
	var used = int(pos)
	_carry = _carry.slice(used, size - 1) if used < size else []
	_pos = pos - used
	_feed()


func _process(_delta: float) -> void:
	_feed()
	if _pending_end != null and _pieces.empty():
		var end = _pending_end
		_pending_end = null
		emit_signal("answer_played", end)


func _feed() -> void:
	while not _pieces.empty() and _playback.can_push_buffer(_pieces[0].size()):
		_playback.push_buffer(_pieces[0])
		frames_pushed += _pieces[0].size()
		_pieces.pop_front()


func _on_subtitle(text: String, request_id) -> void:
	if request_id == current_id:
		emit_signal("subtitle", text)


func _on_audio(pcm: PoolByteArray, sample_rate: int, request_id) -> void:
	if request_id == current_id:
		push_pcm(pcm, sample_rate)


func _on_finished(end: Dictionary, request_id) -> void:
	if request_id == current_id:
		current_id = -1
		_pending_end = end
