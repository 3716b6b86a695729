# npc_voice_client.gd: Godot 3 client of the npc-voice WebSocket bridge (protocol v1, unity_bridge/protocol.md).
#
# Add it as a node, call connect_to_server(url, token), wait for `connected`, then speak(). It polls its socket in
# _process. Signals carry the request id that speak()/request() returned, so several answers can stream at once.
extends Node

signal connected(welcome)  # welcome: Dictionary {version, server, model, sample_rate}
signal disconnected(code, reason)
signal subtitle(text, request_id)  # text: the whole subtitle so far (the server sends deltas; we join them)
signal audio_chunk(pcm, sample_rate, request_id)  # pcm: PoolByteArray of s16le mono samples
# visemes: Array of {viseme, start_ms, duration_ms} (viseme one of sil PP FF TH DD kk CH SS nn RR aa E I O U),
# words: Array of {text, start_ms, end_ms}; times in ms from the answer's first audio sample. Only when the speak
# config has "lip_sync": true (model v2 servers); each comes before the audio it describes.
signal lip_sync(visemes, words, request_id)
signal answer_finished(end, request_id)  # end: Dictionary {session_id, text, audio_seconds, interrupted, timings}
signal error(code, message, request_id)  # request_id is null for an error about no particular request
signal response(frame)  # replies to request(): health, personas, session, closed, reloaded

const MsgPack = preload("res://addons/npc_voice/msgpack.gd")
const PROTOCOL_VERSION = 1
const CHUNK_BYTES = 16384

var welcome = null  # the server's welcome once connected

var _ws: WebSocketClient = null
var _token = null
var _client_id = ""
var _next_id = 0
var _texts = {}  # request id -> subtitle so far, for answers in flight
var _handshake_done = false
var _close_code = -1
var _close_reason = ""


func is_connected_to_server() -> bool:
	return _ws != null and _handshake_done and _ws.get_connection_status() == NetworkedMultiplayerPeer.CONNECTION_CONNECTED


func connect_to_server(url: String, token = null, client_id: String = "") -> int:
	close()
	_ws = WebSocketClient.new()
	if _ws.has_method("set_buffers"):  # answers stream in faster than real time: room for many frames
		_ws.set_buffers(4096, 4096, 2048, 1024)
	_ws.connect("connection_established", self, "_on_open")
	_ws.connect("connection_error", self, "_on_closed", [false])
	_ws.connect("connection_closed", self, "_on_closed")
	_ws.connect("server_close_request", self, "_on_close_request")
	_ws.connect("data_received", self, "_on_data")
	_token = token
	_client_id = client_id
	_handshake_done = false
	_close_code = -1
	_close_reason = ""
	return _ws.connect_to_url(url)


func close() -> void:
	if _ws != null:
		_ws.disconnect_from_host(1000, "bye")
		_ws = null
	_handshake_done = false
	_texts.clear()


# Ask an NPC a whole recorded question. config: the protocol's speak config, e.g.
#   {"npc_id": "innkeeper", "encoding": "pcm_s16le", "sample_rate": 22050}  or  {"npc_id": ..., "encoding": "wav"}
#   or {"npc_id": ..., "text": "How much is a room?"}
# Returns the request id used in the signals.
func speak(config: Dictionary, audio: PoolByteArray = PoolByteArray(), chunk_bytes: int = CHUNK_BYTES) -> int:
	var id = start_speak(config)
	var n = audio.size()
	var i = 0
	while i < n:
		var last = min(i + chunk_bytes, n) - 1
		send_audio(id, audio.subarray(i, last))
		i = last + 1
	end_audio(id)
	return id


# Start a question whose audio you stream yourself (send_audio while recording, then end_audio).
func start_speak(config: Dictionary) -> int:
	_next_id += 1
	_texts[_next_id] = ""
	_send({"type": "speak", "id": _next_id, "config": config})
	return _next_id


func send_audio(request_id: int, data: PoolByteArray) -> void:
	_send({"type": "audio", "id": request_id, "data": data})


func end_audio(request_id: int) -> void:
	_send({"type": "end_audio", "id": request_id})


# Interrupt an answer: audio stops; answer_finished still comes, with end.interrupted == true.
func cancel(request_id: int) -> void:
	if _texts.has(request_id):
		_send({"type": "cancel", "id": request_id})


# Other requests: "health", "list_personas", "reload_personas", "open_session" (fields npc_id, session_id),
# "close_session" (field session_id). The reply comes as the `response` signal (or `error`) with the same id.
func request(type: String, fields: Dictionary = {}) -> int:
	_next_id += 1
	var frame = {"type": type, "id": _next_id}
	for k in fields:
		frame[k] = fields[k]
	_send(frame)
	return _next_id


func _process(_delta: float) -> void:
	if _ws != null:
		_ws.poll()


func _send(frame: Dictionary) -> void:
	if _ws == null or (not _handshake_done and frame.type != "hello"):
		if frame.type == "speak":
			_texts.erase(frame.id)
		emit_signal("error", "UNAVAILABLE", "not connected (wait for the `connected` signal)", frame.get("id"))
		return
	var err = _ws.get_peer(1).put_packet(MsgPack.encode(frame))
	if err != OK:
		emit_signal("error", "UNAVAILABLE", "could not send a frame (error %d)" % err, frame.get("id"))


func _on_open(_protocol: String) -> void:
	_ws.get_peer(1).set_write_mode(WebSocketPeer.WRITE_MODE_BINARY)
	var hello = {"type": "hello", "version": PROTOCOL_VERSION}
	if _token != null:
		hello["token"] = _token
	if _client_id != "":
		hello["client_id"] = _client_id
	_send(hello)


func _on_close_request(code: int, reason: String) -> void:
	_close_code = code
	_close_reason = reason


func _on_closed(_was_clean: bool) -> void:
	for id in _texts.keys():
		emit_signal("error", "UNAVAILABLE", "the connection closed", id)
	_texts.clear()
	_handshake_done = false
	call_deferred("_drop_socket", _ws)  # not now: the socket is emitting this signal
	emit_signal("disconnected", _close_code, _close_reason)


func _drop_socket(ws) -> void:
	if _ws == ws:
		_ws = null


func _on_data() -> void:
	var peer = _ws.get_peer(1)
	while _ws != null and peer.get_available_packet_count() > 0:
		var packet = peer.get_packet()
		if peer.was_string_packet():
			emit_signal("error", "INTERNAL", "the server sent a text frame", null)
			continue
		var r = MsgPack.decode(packet)
		if r.error != "" or typeof(r.value) != TYPE_DICTIONARY:
			emit_signal("error", "INTERNAL", "bad frame from the server: " + r.error, null)
			continue
		_route(r.value)


func _route(f: Dictionary) -> void:
	var type = f.get("type", "")
	var id = f.get("id")
	if not _handshake_done:
		if type == "welcome":
			_handshake_done = true
			welcome = f
			emit_signal("connected", f)
		elif type == "error":
			emit_signal("error", f.get("code", ""), f.get("message", ""), null)
		return
	match type:
		"text":
			if _texts.has(id):
				_texts[id] += f.get("text", "")
				emit_signal("subtitle", _texts[id], id)
		"audio":
			emit_signal("audio_chunk", f.get("pcm", PoolByteArray()), int(f.get("sample_rate", 0)), id)
		"lip_sync":
			emit_signal("lip_sync", f.get("visemes", []), f.get("words", []), id)
		"end":
			_texts.erase(id)
			emit_signal("answer_finished", f, id)
		"error":
			_texts.erase(id)
			emit_signal("error", f.get("code", ""), f.get("message", ""), id)
		_:
			emit_signal("response", f)
