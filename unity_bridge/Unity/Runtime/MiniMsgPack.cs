// MiniMsgPack: a small msgpack encoder/decoder for the subset the npc-voice bridge uses (no UnityEngine dependency).
using System;
using System.Collections;
using System.Collections.Generic;
using System.IO;
using System.Text;

namespace NpcVoice
{
    /// <summary>
    /// Encodes and decodes msgpack values: nil, bool, integers, floats, strings, binary, arrays and maps.
    /// Decoded values are null, bool, long (ulong above long.MaxValue), double, string, byte[],
    /// List&lt;object&gt; and Dictionary&lt;string, object&gt; (non-string map keys are turned into text).
    /// </summary>
    public static class MiniMsgPack
    {
        public static byte[] Encode(object value)
        {
            using (var ms = new MemoryStream())
            {
                Write(ms, value);
                return ms.ToArray();
            }
        }

        public static object Decode(byte[] data)
        {
            return Decode(data, 0, data.Length);
        }

        public static object Decode(byte[] data, int offset, int count)
        {
            int pos = offset, end = offset + count;
            object v = Read(data, ref pos, end, 0);
            if (pos != end) throw new FormatException("msgpack: " + (end - pos) + " trailing byte(s) after the value");
            return v;
        }

        // ---- encoding -----------------------------------------------------------------------------------

        static void Write(Stream s, object v)
        {
            if (v == null) { s.WriteByte(0xc0); return; }
            if (v is bool) { s.WriteByte((bool)v ? (byte)0xc3 : (byte)0xc2); return; }
            if (v is string) { WriteString(s, (string)v); return; }
            if (v is byte[]) { WriteBin(s, (byte[])v); return; }
            if (v is ArraySegment<byte>) { var seg = (ArraySegment<byte>)v; WriteBin(s, seg.Array, seg.Offset, seg.Count); return; }
            if (v is float || v is double || v is decimal)
            {
                s.WriteByte(0xcb);
                WriteBE(s, (ulong)BitConverter.DoubleToInt64Bits(Convert.ToDouble(v)), 8);
                return;
            }
            if (v is ulong) { WriteUInt(s, (ulong)v); return; }
            if (v is sbyte || v is byte || v is short || v is ushort || v is int || v is uint || v is long)
            {
                long n = Convert.ToInt64(v);
                if (n >= 0) WriteUInt(s, (ulong)n); else WriteNegInt(s, n);
                return;
            }
            if (v is Enum) { WriteString(s, v.ToString()); return; }
            var dict = v as IDictionary;
            if (dict != null)
            {
                WriteHeader(s, dict.Count, 0x80, 0xde);
                foreach (DictionaryEntry e in dict) { Write(s, e.Key); Write(s, e.Value); }
                return;
            }
            var list = v as IList;
            if (list != null)
            {
                WriteHeader(s, list.Count, 0x90, 0xdc);
                foreach (object item in list) Write(s, item);
                return;
            }
            throw new ArgumentException("msgpack: cannot encode a " + v.GetType().Name);
        }

        static void WriteHeader(Stream s, int n, int fixBase, int code16)
        {
            if (n < 16) s.WriteByte((byte)(fixBase | n));
            else if (n <= 0xffff) { s.WriteByte((byte)code16); WriteBE(s, (ulong)n, 2); }
            else { s.WriteByte((byte)(code16 + 1)); WriteBE(s, (ulong)n, 4); }
        }

        static void WriteString(Stream s, string str)
        {
            byte[] b = Encoding.UTF8.GetBytes(str);
            int n = b.Length;
            if (n < 32) s.WriteByte((byte)(0xa0 | n));
            else if (n <= 0xff) { s.WriteByte(0xd9); s.WriteByte((byte)n); }
            else if (n <= 0xffff) { s.WriteByte(0xda); WriteBE(s, (ulong)n, 2); }
            else { s.WriteByte(0xdb); WriteBE(s, (ulong)n, 4); }
            s.Write(b, 0, n);
        }

        static void WriteBin(Stream s, byte[] b) { WriteBin(s, b, 0, b.Length); }

        static void WriteBin(Stream s, byte[] b, int offset, int n)
        {
            if (n <= 0xff) { s.WriteByte(0xc4); s.WriteByte((byte)n); }
            else if (n <= 0xffff) { s.WriteByte(0xc5); WriteBE(s, (ulong)n, 2); }
            else { s.WriteByte(0xc6); WriteBE(s, (ulong)n, 4); }
            s.Write(b, offset, n);
        }

        static void WriteUInt(Stream s, ulong n)
        {
            if (n < 128) s.WriteByte((byte)n);
            else if (n <= 0xff) { s.WriteByte(0xcc); s.WriteByte((byte)n); }
            else if (n <= 0xffff) { s.WriteByte(0xcd); WriteBE(s, n, 2); }
            else if (n <= 0xffffffff) { s.WriteByte(0xce); WriteBE(s, n, 4); }
            else { s.WriteByte(0xcf); WriteBE(s, n, 8); }
        }

        static void WriteNegInt(Stream s, long n)
        {
            if (n >= -32) s.WriteByte((byte)(sbyte)n);
            else if (n >= sbyte.MinValue) { s.WriteByte(0xd0); s.WriteByte((byte)(sbyte)n); }
            else if (n >= short.MinValue) { s.WriteByte(0xd1); WriteBE(s, (ulong)n, 2); }
            else if (n >= int.MinValue) { s.WriteByte(0xd2); WriteBE(s, (ulong)n, 4); }
            else { s.WriteByte(0xd3); WriteBE(s, (ulong)n, 8); }
        }

        static void WriteBE(Stream s, ulong v, int bytes)
        {
            for (int i = bytes - 1; i >= 0; i--) s.WriteByte((byte)(v >> (8 * i)));
        }

        // ---- decoding -----------------------------------------------------------------------------------

        const int MaxDepth = 64;

        static object Read(byte[] b, ref int p, int end, int depth)
        {
            if (depth > MaxDepth) throw new FormatException("msgpack: nested too deeply");
            Need(p, 1, end);
            byte c = b[p++];
            if (c <= 0x7f) return (long)c;
            if (c >= 0xe0) return (long)(sbyte)c;
            if ((c & 0xe0) == 0xa0) return ReadStr(b, ref p, end, c & 0x1f);
            if ((c & 0xf0) == 0x90) return ReadArray(b, ref p, end, c & 0x0f, depth);
            if ((c & 0xf0) == 0x80) return ReadMap(b, ref p, end, c & 0x0f, depth);
            switch (c)
            {
                case 0xc0: return null;
                case 0xc2: return false;
                case 0xc3: return true;
                case 0xc4: return ReadBin(b, ref p, end, (int)ReadBE(b, ref p, end, 1));
                case 0xc5: return ReadBin(b, ref p, end, (int)ReadBE(b, ref p, end, 2));
                case 0xc6: return ReadBin(b, ref p, end, Len(ReadBE(b, ref p, end, 4)));
                case 0xca: return (double)BitConverter.ToSingle(BitConverter.GetBytes((int)ReadBE(b, ref p, end, 4)), 0);
                case 0xcb: return BitConverter.Int64BitsToDouble((long)ReadBE(b, ref p, end, 8));
                case 0xcc: return (long)ReadBE(b, ref p, end, 1);
                case 0xcd: return (long)ReadBE(b, ref p, end, 2);
                case 0xce: return (long)ReadBE(b, ref p, end, 4);
                case 0xcf:
                {
                    ulong u = ReadBE(b, ref p, end, 8);
                    if (u > long.MaxValue) return u;
                    return (long)u;
                }
                case 0xd0: return (long)(sbyte)ReadBE(b, ref p, end, 1);
                case 0xd1: return (long)(short)ReadBE(b, ref p, end, 2);
                case 0xd2: return (long)(int)ReadBE(b, ref p, end, 4);
                case 0xd3: return (long)ReadBE(b, ref p, end, 8);
                case 0xd9: return ReadStr(b, ref p, end, (int)ReadBE(b, ref p, end, 1));
                case 0xda: return ReadStr(b, ref p, end, (int)ReadBE(b, ref p, end, 2));
                case 0xdb: return ReadStr(b, ref p, end, Len(ReadBE(b, ref p, end, 4)));
                case 0xdc: return ReadArray(b, ref p, end, (int)ReadBE(b, ref p, end, 2), depth);
                case 0xdd: return ReadArray(b, ref p, end, Len(ReadBE(b, ref p, end, 4)), depth);
                case 0xde: return ReadMap(b, ref p, end, (int)ReadBE(b, ref p, end, 2), depth);
                case 0xdf: return ReadMap(b, ref p, end, Len(ReadBE(b, ref p, end, 4)), depth);
            }
            throw new FormatException("msgpack: unsupported type byte 0x" + c.ToString("x2"));
        }

        static int Len(ulong n)
        {
            if (n > int.MaxValue) throw new FormatException("msgpack: length too large");
            return (int)n;
        }

        static void Need(int p, int n, int end)
        {
            if (n < 0 || p + n > end) throw new FormatException("msgpack: truncated data");
        }

        static ulong ReadBE(byte[] b, ref int p, int end, int n)
        {
            Need(p, n, end);
            ulong v = 0;
            for (int i = 0; i < n; i++) v = (v << 8) | b[p++];
            return v;
        }

        static string ReadStr(byte[] b, ref int p, int end, int n)
        {
            Need(p, n, end);
            string s = Encoding.UTF8.GetString(b, p, n);
            p += n;
            return s;
        }

        static byte[] ReadBin(byte[] b, ref int p, int end, int n)
        {
            Need(p, n, end);
            var r = new byte[n];
            Buffer.BlockCopy(b, p, r, 0, n);
            p += n;
            return r;
        }

        static List<object> ReadArray(byte[] b, ref int p, int end, int n, int depth)
        {
            Need(p, n, end);  // every element takes at least one byte
            var list = new List<object>(n);
            for (int i = 0; i < n; i++) list.Add(Read(b, ref p, end, depth + 1));
            return list;
        }

        static Dictionary<string, object> ReadMap(byte[] b, ref int p, int end, int n, int depth)
        {
            Need(p, 2 * n, end);
            var map = new Dictionary<string, object>(n);
            for (int i = 0; i < n; i++)
            {
                object k = Read(b, ref p, end, depth + 1);
                string key = k as string ?? Convert.ToString(k, System.Globalization.CultureInfo.InvariantCulture);
                map[key] = Read(b, ref p, end, depth + 1);
            }
            return map;
        }
    }
}
