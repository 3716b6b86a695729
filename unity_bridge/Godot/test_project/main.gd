# main.gd: headless end-to-end check of the Godot client against a live npc-voice server.
#
# Reads NPC_VOICE_URL, NPC_VOICE_TOKEN, NPC_VOICE_WAV (a 16-bit PCM question), NPC_VOICE_NPC, NPC_VOICE_CANCEL_NPC,
# NPC_VOICE_TIMEOUT_MS (default 90000) and NPC_VOICE_LIP_SYNC (1: the first answer asks for lip-sync timings and
# checks them; a model v2 server) from the environment; prints "RESULT ok ..." and quits with 0, or "FAIL ..." and
# quits with 1.
extends Node

const Client = preload("res://addons/npc_voice/npc_voice_client.gd")
const Player = preload("res://addons/npc_voice/npc_voice_player.gd")
const MsgPack = preload("res://addons/npc_voice/msgpack.gd")
var timeout_ms = 90000  # NPC_VOICE_TIMEOUT_MS overrides it

var client
var player
var events = {}  # request id -> {"audio_bytes", "rate", "seqs", "subtitle", "end", "error"}
var responses = {}
var conn_errors = []
var failed = false
var t_start = 0


func _ready() -> void:
	t_start = OS.get_ticks_msec()
	if OS.get_environment("NPC_VOICE_TIMEOUT_MS") != "":
		timeout_ms = int(OS.get_environment("NPC_VOICE_TIMEOUT_MS"))
	_run()


func _process(_delta: float) -> void:
	if OS.get_ticks_msec() - t_start > timeout_ms and not failed:
		_fail("timed out")


func _fail(msg: String) -> void:
	failed = true
	print("FAIL " + msg)
	get_tree().quit(1)


func _check(ok: bool, what: String) -> bool:
	if not ok and not failed:
		_fail("check failed: " + what)
	return ok


func _rec(id) -> Dictionary:
	if not events.has(id):
		events[id] = {"audio_bytes": 0, "rate": 0, "seqs": [], "subtitle": "", "end": null, "error": null}
	return events[id]


func _on_subtitle(text, id) -> void:
	_rec(id).subtitle = text


func _on_audio(pcm, rate, id) -> void:
	var r = _rec(id)
	r.audio_bytes += pcm.size()
	r.rate = rate
	r.seqs.append(r.seqs.size())
	if id == _cancel_id and r.seqs.size() == 1:
		player.cancel()  # the player walks away after the first chunk


func _on_finished(end, id) -> void:
	_rec(id).end = end


func _on_error(code, message, id) -> void:
	if id == null:
		conn_errors.append(code)
	else:
		_rec(id).error = code


func _on_response(frame) -> void:
	responses[frame.get("id")] = frame


var _cancel_id = -100
var played = []
var lips = {"visemes": [], "words": []}  # lip_sync frames of all answers
var shapes_heard = 0  # the player's viseme signals


func _on_lip_sync(visemes, words, _id) -> void:
	lips.visemes += visemes
	lips.words += words


func _on_viseme(_viseme, _seconds) -> void:
	shapes_heard += 1


# The first answer's lip-sync timings against its audio and subtitle.
func _check_lip_sync(end) -> bool:
	var v = lips.visemes
	var shapes = ["sil", "PP", "FF", "TH", "DD", "kk", "CH", "SS", "nn", "RR", "aa", "E", "I", "O", "U"]
	if not _check(v.size() > 0 and lips.words.size() > 0, "lip_sync frames came"):
		return false
	for i in range(v.size()):
		if not _check(v[i].viseme in shapes and v[i].duration_ms > 0, "viseme %s" % str(v[i])):
			return false
		if i > 0 and not _check(abs(v[i - 1].start_ms + v[i - 1].duration_ms - v[i].start_ms) < 1e-6, "visemes tile at %s" % str(v[i])):
			return false
	var last = v[v.size() - 1]
	if not _check(abs(last.start_ms + last.duration_ms - end.audio_seconds * 1000.0) < 1.0, "visemes cover the audio"):
		return false
	var spoken = PoolStringArray()
	for w in lips.words:
		spoken.append(w.text)
	var subtitle = PoolStringArray()
	for t in end.text.split(" ", false):
		subtitle.append(t)
	return _check(spoken.join(" ") == subtitle.join(" "), "words '%s' spell the subtitle '%s'" % [spoken.join(" "), subtitle.join(" ")])


func _on_played(end) -> void:
	played.append(end)


func _wait_for(id) -> void:
	while not failed and _rec(id).end == null and _rec(id).error == null:
		yield(get_tree(), "idle_frame")


func read_wav(path: String) -> Dictionary:
	var f = File.new()
	if f.open(path, File.READ) != OK:
		return {"error": "cannot open " + path}
	var data = f.get_buffer(f.get_len())
	f.close()
	var b = StreamPeerBuffer.new()
	b.data_array = data
	if data.size() < 12 or data.subarray(0, 3).get_string_from_ascii() != "RIFF":
		return {"error": path + " is not a RIFF/WAVE file"}
	var pos = 12
	var rate = 0
	var channels = 0
	var bits = 0
	while pos + 8 <= data.size():
		var id = data.subarray(pos, pos + 3).get_string_from_ascii()
		b.seek(pos + 4)
		var size = b.get_u32()
		if id == "fmt ":
			b.seek(pos + 10)
			channels = b.get_u16()
			rate = b.get_u32()
			b.seek(pos + 22)
			bits = b.get_u16()
		elif id == "data":
			if bits != 16 or channels != 1:
				return {"error": "need 16-bit mono wav"}
			var end = min(pos + 8 + size, data.size())
			return {"pcm": data.subarray(pos + 8, end - 1), "rate": rate, "bytes": data}
		pos += 8 + size + (size & 1)
	return {"error": "no data chunk"}


func _run() -> void:
	var url = OS.get_environment("NPC_VOICE_URL")
	var token = OS.get_environment("NPC_VOICE_TOKEN")
	var npc = OS.get_environment("NPC_VOICE_NPC")
	var cancel_npc = OS.get_environment("NPC_VOICE_CANCEL_NPC")
	var wav = read_wav(OS.get_environment("NPC_VOICE_WAV"))
	if wav.has("error"):
		_fail(wav.error)
		return

	# msgpack round trip of every type we use
	var value = {"nil": null, "t": true, "f": false, "i": 5, "neg": -3, "neg8": -100, "u16": 40000, "i32": -70000,
			"big": 1 << 40, "pi": 3.25, "s": "héllo", "long": "x".repeat(300), "bin": PoolByteArray([1, 2, 3]),
			"arr": [1, "a", null], "map": {"k": 1.5}}
	var back = MsgPack.decode(MsgPack.encode(value))
	if not _check(back.error == "" and str(back.value) == str(value), "msgpack round trip: %s" % str(back)):
		return
	if not _check(MsgPack.decode(PoolByteArray([0x92, 0x01])).error != "", "truncated msgpack refused"):
		return

	# a wrong token: an error frame, then the server closes with 1008
	var bad = Client.new()
	add_child(bad)
	bad.connect("error", self, "_on_error")
	bad.connect_to_server(url, "wrong-token")
	var closed = yield(bad, "disconnected")
	if not _check(conn_errors == ["UNAUTHENTICATED"], "bad token refused: %s" % str(conn_errors)):
		return
	if not _check(closed[0] == 1008, "close code 1008, got %s" % str(closed)):
		return

	client = Client.new()
	add_child(client)
	for s in [["subtitle", "_on_subtitle"], ["audio_chunk", "_on_audio"], ["answer_finished", "_on_finished"],
			["error", "_on_error"], ["response", "_on_response"], ["lip_sync", "_on_lip_sync"]]:
		client.connect(s[0], self, s[1])
	var lip_sync = OS.get_environment("NPC_VOICE_LIP_SYNC") == "1"
	player = Player.new()
	player.npc_id = npc
	player.lip_sync = lip_sync
	add_child(player)
	player.attach(client)
	player.connect("answer_played", self, "_on_played")
	player.connect("viseme", self, "_on_viseme")
	client.connect_to_server(url, token, "godot-test")
	var welcome = yield(client, "connected")
	if not _check(welcome.version == 1 and welcome.sample_rate > 0, "welcome"):
		return
	var hid = client.request("health")
	while not responses.has(hid) and not failed:
		yield(get_tree(), "idle_frame")
	if not _check(responses[hid].status == "ok", "health"):
		return

	# a recorded question as pcm, streamed in chunks; the player resamples the answer to its mix rate
	var t0 = OS.get_ticks_msec()
	var id = player.ask(wav.pcm, wav.rate, "pcm_s16le", {"output_sample_rate": 16000})
	yield(_wait_for(id), "completed")
	var r = _rec(id)
	if not _check(r.error == null and r.end != null, "answer ended: %s" % str(r.error)):
		return
	var ms = OS.get_ticks_msec() - t0
	var seconds = r.audio_bytes / 2.0 / r.rate
	if not _check(r.rate == 16000 and r.audio_bytes > 0, "audio at 16 kHz"):
		return
	if not _check(abs(seconds - r.end.audio_seconds) < 1e-6,
			"received %f s == end.audio_seconds %f" % [seconds, r.end.audio_seconds]):
		return
	if not _check(r.subtitle != "" and r.subtitle == r.end.text, "subtitle '%s' == end.text" % r.subtitle):
		return
	if not _check(r.end.interrupted == false, "not interrupted"):
		return
	var expected_frames = r.end.audio_seconds * player.mix_rate
	if not _check(abs(player.frames_queued - expected_frames) <= player.mix_rate / 16000.0 + 1,
			"resampled %d frames for %f s at %f Hz" % [player.frames_queued, r.end.audio_seconds, player.mix_rate]):
		return
	while not failed and played.empty() and OS.get_ticks_msec() - t0 < 30000:
		yield(get_tree(), "idle_frame")
	var frames_pushed = player.frames_pushed
	var frames_queued = player.frames_queued
	var n_visemes = lips.visemes.size()
	if lip_sync:
		if not _check_lip_sync(r.end):
			return
		if not _check(played.size() == 1 and shapes_heard == n_visemes,
				"the player gave out %d of %d visemes while the answer played" % [shapes_heard, n_visemes]):
			return
	elif not _check(n_visemes == 0 and lips.words.empty(), "no lip_sync frames unless asked"):
		return

	# the whole wav file as the question
	var wid = client.speak({"npc_id": npc, "encoding": "wav"}, wav.bytes)
	yield(_wait_for(wid), "completed")
	if not _check(_rec(wid).end != null, "wav question answered: %s" % str(_rec(wid).error)):
		return

	# cancel after the first audio chunk
	_cancel_id = client.start_speak({"npc_id": cancel_npc, "sample_rate": wav.rate, "output_sample_rate": 16000})
	player.current_id = _cancel_id
	client.send_audio(_cancel_id, wav.pcm)
	client.end_audio(_cancel_id)
	yield(_wait_for(_cancel_id), "completed")
	var c = _rec(_cancel_id)
	if not _check(c.end != null and c.end.interrupted == true, "cancel -> interrupted: %s" % str(c.end)):
		return
	if not _check(abs(c.audio_bytes / 2.0 / 16000 - c.end.audio_seconds) < 1e-6, "cancelled audio_seconds"):
		return

	# an unknown NPC: an error for that request, the connection stays up
	var gid = client.speak({"npc_id": "ghost", "text": "hello"})
	yield(_wait_for(gid), "completed")
	if not _check(_rec(gid).error == "NOT_FOUND", "unknown NPC -> NOT_FOUND: %s" % str(_rec(gid).error)):
		return
	hid = client.request("health")
	while not responses.has(hid) and not failed:
		yield(get_tree(), "idle_frame")
	client.close()
	print("RESULT ok audio_seconds=%.3f subtitle_chars=%d answer_ms=%d server_ttfa_ms=%.1f frames_queued=%d frames_pushed=%d mix_rate=%d played=%d cancelled_seconds=%.3f visemes=%d" % [
		r.end.audio_seconds, r.subtitle.length(), ms, r.end.timings.time_to_first_audio_ms, frames_queued,
		frames_pushed, player.mix_rate, played.size(), c.end.audio_seconds, n_visemes])
	get_tree().quit(0)
