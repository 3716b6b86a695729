# npc_voice_player.gd: plays an npc-voice answer as it streams in, through AudioStreamGenerator.push_buffer (Godot 3).
#
# Add it as a child (it is an AudioStreamPlayer; for positional sound change `extends` to AudioStreamPlayer3D),
# point `client_path` at an npc_voice_client.gd node, then call ask() or
# ask_text(). The s16le mono PCM from the server is resampled (linear) to the generator's mix rate and pushed as
# stereo Vector2 frames. Signals: subtitle(text), answer_played(end) once the answer has been heard to the end, and
# with lip_sync on: viseme(viseme, seconds) when the mouth takes a new shape and word(text, seconds) when a word
# starts, as the audio plays (drive a face's blend shapes or a karaoke subtitle from them).
extends AudioStreamPlayer

signal subtitle(text)
signal answer_played(end)
signal viseme(viseme, seconds)  # viseme: sil PP FF TH DD kk CH SS nn RR aa E I O U; seconds: how long it holds
signal word(text, seconds)

export(NodePath) var client_path
export(String) var npc_id = "innkeeper"
export(String) var session_id = ""
export(float) var buffer_seconds = 0.5
export(bool) var lip_sync = true  # ask for viseme / word timings (model v2 servers)

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
var _visemes = []  # lip-sync timings of the current answer not given out yet, in time order
var _words = []
var _capacity = 0  # frames the generator's buffer holds: pushed - (capacity - free) = played
var visemes_given = 0  # viseme signals emitted for the current answer

const PIECE_FRAMES = 512


func _ready() -> void:
	var gen = AudioStreamGenerator.new()
	gen.mix_rate = AudioServer.get_mix_rate()
	gen.buffer_length = buffer_seconds
	stream = gen
	mix_rate = gen.mix_rate
	play()
	_playback = get_stream_playback()
	_capacity = _playback.get_frames_available()
	if client_path:
		attach(get_node(client_path))


func attach(npc_client) -> void:
	client = npc_client
	client.connect("subtitle", self, "_on_subtitle")
	client.connect("audio_chunk", self, "_on_audio")
	client.connect("lip_sync", self, "_on_lip_sync")
	client.connect("answer_finished", self, "_on_finished")


# Ask with a recording: pcm s16le mono at sample_rate (or a whole wav file with encoding "wav").
func ask(audio: PoolByteArray, sample_rate: int = 16000, encoding: String = "pcm_s16le", extra: Dictionary = {}) -> int:
	var config = {"npc_id": npc_id, "session_id": session_id, "encoding": encoding}
	if lip_sync:
		config["lip_sync"] = true
	if encoding == "pcm_s16le":
		config["sample_rate"] = sample_rate
	for k in extra:
		config[k] = extra[k]
	_interrupt(config)
	current_id = client.speak(config, audio)
	return current_id


func ask_text(text: String, extra: Dictionary = {}) -> int:
	var config = {"npc_id": npc_id, "session_id": session_id, "text": text}
	if lip_sync:
		config["lip_sync"] = true
	for k in extra:
		config[k] = extra[k]
	_interrupt(config)
	current_id = client.speak(config)
	return current_id


# The player asks again while the NPC speaks: silence now. In a conversation (session_id) the new question stops the
# answer on the server (barge-in) and config gets heard_seconds, so the conversation keeps what the player heard;
# without one the answer is cancelled.
func _interrupt(config: Dictionary) -> void:
	if current_id >= 0 and session_id != "" and client != null:
		config["heard_seconds"] = played_seconds()
		current_id = -1
		clear()
	else:
		cancel()


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
	_visemes.clear()
	_words.clear()
	visemes_given = 0
	frames_queued = 0
	frames_pushed = 0
	if _playback != null and _playback.get_frames_available() < int(buffer_seconds * mix_rate) - 1:
		stop()  # the generator's buffer can only be cleared while it is not playing
		_playback.clear_buffer()
		play()
		_playback = get_stream_playback()
		_capacity = _playback.get_frames_available()


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


# Seconds of the current answer heard so far: frames pushed minus those still in the generator's buffer.
func played_seconds() -> float:
	var buffered = max(_capacity - _playback.get_frames_available(), 0)
	return max(frames_pushed - buffered, 0) / mix_rate


func _process(_delta: float) -> void:
	_feed()
	if not _visemes.empty() or not _words.empty():
		var ms = played_seconds() * 1000.0
		while not _visemes.empty() and _visemes[0].start_ms <= ms:
			var v = _visemes.pop_front()
			visemes_given += 1
			emit_signal("viseme", v.viseme, v.duration_ms / 1000.0)
		while not _words.empty() and _words[0].start_ms <= ms:
			var w = _words.pop_front()
			emit_signal("word", w.text, (w.end_ms - w.start_ms) / 1000.0)
	if _pending_end != null and _pieces.empty() and _visemes.empty():
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


func _on_lip_sync(visemes: Array, words: Array, request_id) -> void:
	if request_id == current_id:
		_visemes += visemes
		_words += words


func _on_finished(end: Dictionary, request_id) -> void:
	if request_id == current_id:
		current_id = -1
		_pending_end = end
