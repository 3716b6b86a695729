# msgpack.gd: a small msgpack encoder/decoder (Godot 3) for the subset the npc-voice bridge uses.
#
# Values: null, bool, int, float (encoded as float64), String, PoolByteArray (bin), Array, Dictionary.
# Usage:  var MsgPack = preload("res://addons/npc_voice/msgpack.gd")
#         var bytes = MsgPack.encode({"type": "health", "id": 1})
#         var r = MsgPack.decode(bytes)   # {"value": ..., "error": ""}; error is non-empty for malformed data
extends Reference

const MAX_DEPTH = 64


static func encode(value) -> PoolByteArray:
	var b = StreamPeerBuffer.new()
	b.big_endian = true
	_write(b, value)
	return b.data_array


static func decode(data: PoolByteArray) -> Dictionary:
	var b = StreamPeerBuffer.new()
	b.big_endian = true
	b.data_array = data
	var state = {"error": ""}
	var value = _read(b, state, 0)
	if state.error == "" and b.get_available_bytes() > 0:
		state.error = "msgpack: %d trailing byte(s)" % b.get_available_bytes()
	return {"value": null if state.error != "" else value, "error": state.error}


# ---- encoding ----------------------------------------------------------------------------------------------

static func _write(b: StreamPeerBuffer, v) -> void:
	match typeof(v):
		TYPE_NIL:
			b.put_u8(0xc0)
		TYPE_BOOL:
			b.put_u8(0xc3 if v else 0xc2)
		TYPE_INT:
			_write_int(b, v)
		TYPE_REAL:
			b.put_u8(0xcb)
			b.put_double(v)
		TYPE_STRING:
			var u: PoolByteArray = v.to_utf8()
			var n = u.size()
			if n < 32:
				b.put_u8(0xa0 | n)
			elif n <= 0xff:
				b.put_u8(0xd9)
				b.put_u8(n)
			elif n <= 0xffff:
				b.put_u8(0xda)
				b.put_u16(n)
			else:
				b.put_u8(0xdb)
				b.put_u32(n)
			b.put_data(u)
		TYPE_RAW_ARRAY:
			var n = v.size()
			if n <= 0xff:
				b.put_u8(0xc4)
				b.put_u8(n)
			elif n <= 0xffff:
				b.put_u8(0xc5)
				b.put_u16(n)
			else:
				b.put_u8(0xc6)
				b.put_u32(n)
			b.put_data(v)
		TYPE_ARRAY:
			_write_header(b, v.size(), 0x90, 0xdc)
			for item in v:
				_write(b, item)
		TYPE_DICTIONARY:
			_write_header(b, v.size(), 0x80, 0xde)
			for key in v:
				_write(b, key)
				_write(b, v[key])
		_:
			push_error("msgpack: cannot encode a value of type %d" % typeof(v))
			b.put_u8(0xc0)


static func _write_header(b: StreamPeerBuffer, n: int, fix_base: int, code16: int) -> void:
	if n < 16:
		b.put_u8(fix_base | n)
	elif n <= 0xffff:
		b.put_u8(code16)
		b.put_u16(n)
	else:
		b.put_u8(code16 + 1)
		b.put_u32(n)


static func _write_int(b: StreamPeerBuffer, n: int) -> void:
	if n >= 0:
		if n < 128:
			b.put_u8(n)
		elif n <= 0xff:
			b.put_u8(0xcc)
			b.put_u8(n)
		elif n <= 0xffff:
			b.put_u8(0xcd)
			b.put_u16(n)
		elif n <= 0xffffffff:
			b.put_u8(0xce)
			b.put_u32(n)
		else:
			b.put_u8(0xcf)
			b.put_u64(n)
	elif n >= -32:
		b.put_8(n)
	elif n >= -128:
		b.put_u8(0xd0)
		b.put_8(n)
	elif n >= -32768:
		b.put_u8(0xd1)
		b.put_16(n)
	elif n >= -2147483648:
		b.put_u8(0xd2)
		b.put_32(n)
	else:
		b.put_u8(0xd3)
		b.put_64(n)


# ---- decoding ----------------------------------------------------------------------------------------------

static func _need(b: StreamPeerBuffer, state: Dictionary, n: int) -> bool:
	if state.error != "":
		return false
	if n < 0 or b.get_available_bytes() < n:
		state.error = "msgpack: truncated data"
		return false
	return true


static func _read(b: StreamPeerBuffer, state: Dictionary, depth: int):
	if depth > MAX_DEPTH:
		state.error = "msgpack: nested too deeply"
		return null
	if not _need(b, state, 1):
		return null
	var c = b.get_u8()
	if c <= 0x7f:
		return c
	if c >= 0xe0:
		return c - 256
	if (c & 0xe0) == 0xa0:
		return _read_str(b, state, c & 0x1f)
	if (c & 0xf0) == 0x90:
		return _read_array(b, state, c & 0x0f, depth)
	if (c & 0xf0) == 0x80:
		return _read_map(b, state, c & 0x0f, depth)
	match c:
		0xc0:
			return null
		0xc2:
			return false
		0xc3:
			return true
		0xc4, 0xc5, 0xc6:
			var n = _read_len(b, state, [1, 2, 4][c - 0xc4])
			if not _need(b, state, n):
				return null
			if n == 0:
				return PoolByteArray()
			var r = b.get_data(n)
			return r[1]
		0xca:
			return b.get_float() if _need(b, state, 4) else null
		0xcb:
			return b.get_double() if _need(b, state, 8) else null
		0xcc:
			return b.get_u8() if _need(b, state, 1) else null
		0xcd:
			return b.get_u16() if _need(b, state, 2) else null
		0xce:
			return b.get_u32() if _need(b, state, 4) else null
		0xcf:
			return b.get_u64() if _need(b, state, 8) else null
		0xd0:
			return b.get_8() if _need(b, state, 1) else null
		0xd1:
			return b.get_16() if _need(b, state, 2) else null
		0xd2:
			return b.get_32() if _need(b, state, 4) else null
		0xd3:
			return b.get_64() if _need(b, state, 8) else null
		0xd9, 0xda, 0xdb:
			return _read_str(b, state, _read_len(b, state, [1, 2, 4][c - 0xd9]))
		0xdc, 0xdd:
			return _read_array(b, state, _read_len(b, state, [2, 4][c - 0xdc]), depth)
		0xde, 0xdf:
			return _read_map(b, state, _read_len(b, state, [2, 4][c - 0xde]), depth)
	state.error = "msgpack: unsupported type byte 0x%02x" % c
	return null


static func _read_len(b: StreamPeerBuffer, state: Dictionary, size: int) -> int:
	if not _need(b, state, size):
		return -1
	match size:
		1:
			return b.get_u8()
		2:
			return b.get_u16()
	return b.get_u32()


static func _read_str(b: StreamPeerBuffer, state: Dictionary, n: int):
	if not _need(b, state, n):
		return null
	if n == 0:
		return ""
	var r = b.get_data(n)
	return r[1].get_string_from_utf8()


static func _read_array(b: StreamPeerBuffer, state: Dictionary, n: int, depth: int):
	if not _need(b, state, n):  # every element takes at least one byte
		return null
	var out = []
	for i in range(n):
		out.append(_read(b, state, depth + 1))
		if state.error != "":
			return null
	return out


static func _read_map(b: StreamPeerBuffer, state: Dictionary, n: int, depth: int):
	if not _need(b, state, 2 * n):
		return null
	var out = {}
	for i in range(n):
		var key = _read(b, state, depth + 1)
		var value = _read(b, state, depth + 1)
		if state.error != "":
			return null
		out[key] = value
	return out
