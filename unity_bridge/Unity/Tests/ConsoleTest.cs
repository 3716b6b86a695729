// ConsoleTest: a headless end-to-end check of NpcVoiceClient against a live npc-voice server (run with mono).
#if !UNITY_5_3_OR_NEWER
using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Text;
using System.Threading.Tasks;

namespace NpcVoice.Tests
{
    /// <summary>
    /// Usage: mono ConsoleTest.exe ws://127.0.0.1:PORT TOKEN question.wav NPC CANCEL_NPC [lip-sync]
    /// Prints "RESULT ok ..." and exits 0 when every check passes; "FAIL ..." and exit 1 otherwise. With `lip-sync`
    /// the first answer asks for viseme and word timings and checks them (a model v2 server); without, it checks
    /// that none come.
    /// </summary>
    public static class ConsoleTest
    {
        static int checks;

        static void Check(bool ok, string what)
        {
            checks++;
            if (!ok) throw new Exception("check failed: " + what);
        }

        public static int Main(string[] args)
        {
            if (args.Length < 5)
            {
                Console.Error.WriteLine("usage: ConsoleTest.exe URL TOKEN question.wav NPC CANCEL_NPC");
                return 2;
            }
            try
            {
                bool lipSync = args.Length > 5 && args[5] == "lip-sync";
                Run(new Uri(args[0]), args[1], args[2], args[3], args[4], lipSync).GetAwaiter().GetResult();
                return 0;
            }
            catch (Exception exc)
            {
                Console.WriteLine("FAIL " + exc);
                return 1;
            }
        }

        /// <summary>Read a 16-bit PCM wav file: samples as s16le bytes, its rate and channel count.</summary>
        static byte[] ReadWav(string path, out int rate, out int channels)
        {
            byte[] b = File.ReadAllBytes(path);
            if (b.Length < 12 || Encoding.ASCII.GetString(b, 0, 4) != "RIFF" || Encoding.ASCII.GetString(b, 8, 4) != "WAVE")
                throw new InvalidDataException(path + " is not a RIFF/WAVE file");
            rate = 0; channels = 0;
            int bits = 0, p = 12;
            while (p + 8 <= b.Length)
            {
                string id = Encoding.ASCII.GetString(b, p, 4);
                int size = BitConverter.ToInt32(b, p + 4);
                if (id == "fmt ")
                {
                    channels = BitConverter.ToInt16(b, p + 10);
                    rate = BitConverter.ToInt32(b, p + 12);
                    bits = BitConverter.ToInt16(b, p + 22);
                }
                else if (id == "data")
                {
                    if (bits != 16) throw new InvalidDataException("only 16-bit PCM wav is supported, not " + bits);
                    size = Math.Min(size, b.Length - p - 8);  // espeak-ng streams may leave the size unset
                    if (size < 0 || size == int.MaxValue) size = b.Length - p - 8;
                    var data = new byte[size - size % (2 * channels)];
                    Buffer.BlockCopy(b, p + 8, data, 0, data.Length);
                    return data;
                }
                p += 8 + size + (size & 1);
            }
            throw new InvalidDataException(path + " has no data chunk");
        }

        static void MsgPackRoundTrip()
        {
            var value = new Dictionary<string, object>
            {
                { "nil", null }, { "t", true }, { "f", false }, { "small", 5 }, { "neg", -3 }, { "neg8", -100 },
                { "u16", 40000 }, { "i32", -70000 }, { "big", 1L << 40 }, { "pi", 3.25 }, { "s", "héllo, wörld" },
                { "long", new string('x', 300) }, { "bin", new byte[70000] }, { "arr", new List<object> { 1, "a", null } },
                { "map", new Dictionary<string, object> { { "k", 1.5f } } },
            };
            var back = (Dictionary<string, object>)MiniMsgPack.Decode(MiniMsgPack.Encode(value));
            Check(back["nil"] == null && (bool)back["t"] && !(bool)back["f"], "msgpack nil/bool");
            Check((long)back["small"] == 5 && (long)back["neg"] == -3 && (long)back["neg8"] == -100, "msgpack small ints");
            Check((long)back["u16"] == 40000 && (long)back["i32"] == -70000 && (long)back["big"] == 1L << 40, "msgpack ints");
            Check((double)back["pi"] == 3.25 && (string)back["s"] == "héllo, wörld", "msgpack float/str");
            Check(((string)back["long"]).Length == 300 && ((byte[])back["bin"]).Length == 70000, "msgpack str8/bin32");
            var arr = (List<object>)back["arr"];
            Check(arr.Count == 3 && (long)arr[0] == 1 && (string)arr[1] == "a" && arr[2] == null, "msgpack array");
            Check((double)((Dictionary<string, object>)back["map"])["k"] == 1.5, "msgpack nested map");
            bool threw = false;
            try { MiniMsgPack.Decode(new byte[] { 0x92, 0x01 }); } catch (FormatException) { threw = true; }
            Check(threw, "truncated msgpack is refused");
        }

        static void RingBufferResamples()
        {
            var ring = new PcmRingBuffer(initialCapacity: 1000);
            ring.SourceRate = 16000;
            var tone = new float[16000];  // 1 s of 440 Hz written in odd pieces, read at 48 kHz stereo in 1024-frame blocks
            for (int i = 0; i < tone.Length; i++) tone[i] = (float)Math.Sin(2 * Math.PI * 440 * i / 16000.0);
            for (int i = 0; i < tone.Length; i += 777) ring.Write(tone, i, Math.Min(777, tone.Length - i));
            Check(ring.Count == 16000, "ring buffer grew to hold all samples");
            ring.Complete();
            var block = new float[2048];
            int frames = 0, got;
            double maxErr = 0;
            bool sameChannels = true;
            while ((got = ring.Read(block, 1024, 2, 48000)) > 0)
            {
                for (int i = 0; i < got; i++)
                {
                    sameChannels &= block[2 * i] == block[2 * i + 1];
                    double want = Math.Sin(2 * Math.PI * 440 * (frames + i) / 48000.0);
                    if (frames + i < 47997)  // the last frames hold the final sample (no right neighbour)
                        maxErr = Math.Max(maxErr, Math.Abs(block[2 * i] - want));
                }
                frames += got;
            }
            Check(sameChannels, "mono copied to both channels");
            Check(Math.Abs(frames - 48000) <= 1, "16 kHz -> 48 kHz gives 3x the frames (" + frames + ")");
            Check(ring.Count == 0, "completed buffer plays out to the last sample");
            Check(maxErr < 0.01, "resampled sine matches the 48 kHz sine (max error " + maxErr + ")");
            Check(block.All(v => v == 0f), "underrun is silence");
        }

        static readonly string[] VisemeSet = { "sil", "PP", "FF", "TH", "DD", "kk", "CH", "SS", "nn", "RR", "aa", "E", "I", "O", "U" };

        static void TimelineGivesOutInOrder()
        {
            var timeline = new LipSyncTimeline();
            timeline.Add(new VisemeTiming { Viseme = "sil", StartMs = 0, DurationMs = 80 });
            timeline.Add(new VisemeTiming { Viseme = "PP", StartMs = 80, DurationMs = 40 });
            timeline.Add(new WordTiming { Text = "my", StartMs = 80, EndMs = 200 });
            Check(timeline.DueVisemes(0).Count == 1 && timeline.DueWords(79.9).Count == 0, "timeline: only what has started");
            var due = timeline.DueVisemes(500);
            Check(due.Count == 1 && due[0].Viseme == "PP" && timeline.DueWords(80)[0].Text == "my", "timeline: the rest in order");
            Check(timeline.Pending == 0, "timeline: nothing left");
        }

        /// <summary>The lip-sync timings of one answer against its audio and subtitle, then played out as
        /// NpcVoiceSpeaker would (a timeline read against the ring buffer's play position).</summary>
        static void CheckLipSync(List<VisemeTiming> visemes, List<WordTiming> words, AnswerEnd end, byte[] pcm, int rate)
        {
            Check(visemes.Count > 0 && words.Count > 0, "lip_sync frames came (" + visemes.Count + " visemes, " + words.Count + " words)");
            Check(visemes.All(v => VisemeSet.Contains(v.Viseme) && v.DurationMs > 0), "visemes from the set, with durations");
            for (int i = 1; i < visemes.Count; i++)
                Check(Math.Abs(visemes[i - 1].StartMs + visemes[i - 1].DurationMs - visemes[i].StartMs) < 1e-6,
                      "visemes tile the time line at " + visemes[i].StartMs);
            var last = visemes[visemes.Count - 1];
            Check(visemes[0].StartMs == 0 && Math.Abs(last.StartMs + last.DurationMs - end.AudioSeconds * 1000) < 1.0,
                  "visemes cover the audio (" + (last.StartMs + last.DurationMs) + " ms vs " + end.AudioSeconds * 1000 + ")");
            string spoken = string.Join(" ", words.Select(w => w.Text));
            string subtitle = string.Join(" ", end.Text.Split(new[] { ' ' }, StringSplitOptions.RemoveEmptyEntries));
            Check(spoken == subtitle, "words spell the subtitle: '" + spoken + "' vs '" + subtitle + "'");
            for (int i = 0; i < words.Count; i++)
                Check(words[i].EndMs >= words[i].StartMs && (i == 0 || words[i].StartMs >= words[i - 1].EndMs - 1e-6),
                      "words in order: " + words[i].Text);

            var ring = new PcmRingBuffer();
            ring.SourceRate = rate;
            ring.WritePcm16(pcm, 0, pcm.Length);
            ring.Complete();
            var timeline = new LipSyncTimeline();
            foreach (var v in visemes) timeline.Add(v);
            var block = new float[2 * 1024];
            double blockMs = 1024 * 1000.0 / 44100, playedMs = 0;
            int given = 0;
            while (ring.Read(block, 1024, 2, 44100) > 0)
            {
                playedMs = ring.PlayedSeconds * 1000;
                foreach (var v in timeline.DueVisemes(playedMs))
                {
                    Check(v.StartMs <= playedMs && v.StartMs > playedMs - blockMs - 1, "viseme given out in the block it starts in");
                    given++;
                }
            }
            Check(Math.Abs(playedMs - end.AudioSeconds * 1000) < 1.0, "play position reaches the end");
            Check(given == visemes.Count, "every viseme given out while the audio played");
        }

        static async Task Run(Uri uri, string token, string wavPath, string npc, string cancelNpc, bool lipSync)
        {
            MsgPackRoundTrip();
            RingBufferResamples();
            TimelineGivesOutInOrder();

            // a wrong token is refused during the handshake
            using (var bad = new NpcVoiceClient())
            {
                string code = null;
                try { await bad.ConnectAsync(uri, "wrong-token"); }
                catch (NpcVoiceException exc) { code = exc.Code; }
                Check(code == "UNAUTHENTICATED", "bad token refused (" + code + ")");
            }

            using (var client = new NpcVoiceClient())
            {
                var welcome = await client.ConnectAsync(uri, token, "mono-test");
                Check(welcome.Version == 1 && welcome.SampleRate > 0, "welcome");
                var health = await client.HealthAsync();
                Check((string)health["status"] == "ok", "health");
                var personas = await client.ListPersonasAsync();
                Check(personas.Any(p => (string)p["id"] == npc), "list_personas has " + npc);

                int rate, channels;
                byte[] pcm = ReadWav(wavPath, out rate, out channels);
                var cfg = new SpeakConfig { NpcId = npc, SampleRate = rate, Channels = channels, OutputSampleRate = 16000,
                                            LipSync = lipSync };
                var subtitle = new StringBuilder();
                var visemes = new List<VisemeTiming>();
                var words = new List<WordTiming>();
                var answerPcm = new MemoryStream();
                long samples = 0;
                int nextSeq = 0, audioRate = 0;
                bool seqOk = true;
                var ring = new PcmRingBuffer();
                var t0 = DateTime.UtcNow;
                double firstAudioMs = -1;
                var speech = await client.SpeakAsync(cfg, pcm, s =>
                {
                    s.Text += t => subtitle.Append(t);
                    s.Viseme += v => visemes.Add(v);
                    s.Word += w => words.Add(w);
                    s.Audio += (data, sr, seq) =>
                    {
                        if (firstAudioMs < 0) firstAudioMs = (DateTime.UtcNow - t0).TotalMilliseconds;
                        answerPcm.Write(data, 0, data.Length);
                        seqOk &= seq == nextSeq++;
                        audioRate = sr;
                        samples += data.Length / 2;
                        ring.SourceRate = sr;
                        ring.WritePcm16(data, 0, data.Length);
                    };
                }, chunkBytes: 4000);
                var end = await speech.Completion;
                Check(!end.Interrupted, "answer not interrupted");
                Check(samples > 0 && audioRate == 16000 && seqOk, "audio frames at 16 kHz with seq 0.. (" + samples + ")");
                double seconds = samples / (double)audioRate;
                Check(Math.Abs(seconds - end.AudioSeconds) < 1e-6,
                      "received audio " + seconds + " s == end.audio_seconds " + end.AudioSeconds);
                Check(subtitle.Length > 0 && subtitle.ToString() == end.Text, "non-empty subtitle equal to end.text");
                Check(end.Timings["time_to_first_audio_ms"] > 0, "timings");
                if (lipSync) CheckLipSync(visemes, words, end, answerPcm.ToArray(), audioRate);
                else Check(visemes.Count == 0 && words.Count == 0, "no lip_sync frames unless asked");
                // play it out at 44.1 kHz stereo as Unity's OnAudioFilterRead would
                ring.Complete();
                var outBlock = new float[2 * 1024];
                long played = 0;
                int n;
                while ((n = ring.Read(outBlock, 1024, 2, 44100)) > 0) played += n;
                Check(Math.Abs(played - seconds * 44100) < 2 && ring.Count == 0,  // the last sample may give a frame more
                      "ring buffer played " + played + " frames for " + seconds + " s");

                // wav input and a session
                string sid = await client.OpenSessionAsync(npc);
                var wavSpeech = await client.SpeakAsync(new SpeakConfig { NpcId = npc, SessionId = sid, Encoding = "wav" },
                                                        File.ReadAllBytes(wavPath));
                var wavEnd = await wavSpeech.Completion;
                Check(wavEnd.SessionId == sid, "session answer");
                Check(await client.CloseSessionAsync(sid), "close_session");

                // cancel after the first audio frame
                Speech cancelSpeech = null;
                long cancelSamples = 0;
                cancelSpeech = await client.SpeakAsync(new SpeakConfig { NpcId = cancelNpc, SampleRate = rate, OutputSampleRate = 16000 },
                                                       pcm, s => s.Audio += (data, sr, seq) =>
                                                       {
                                                           cancelSamples += data.Length / 2;
                                                           if (seq == 0) s.CancelAsync();
                                                       });
                var cancelEnd = await cancelSpeech.Completion;
                Check(cancelEnd.Interrupted, "cancel -> end.interrupted");
                Check(Math.Abs(cancelSamples / 16000.0 - cancelEnd.AudioSeconds) < 1e-6, "cancelled audio_seconds == received");

                // an error ends its request and the connection stays usable
                string err = null;
                var ghost = await client.SpeakAsync(new SpeakConfig { NpcId = "ghost", Text = "hello" }, null);
                try { await ghost.Completion; } catch (NpcVoiceException exc) { err = exc.Code; }
                Check(err == "NOT_FOUND", "unknown NPC -> NOT_FOUND (" + err + ")");
                Check((string)(await client.HealthAsync())["status"] == "ok", "connection still up");
                await client.CloseAsync();

                Console.WriteLine(string.Format(System.Globalization.CultureInfo.InvariantCulture,
                    "RESULT ok checks={0} audio_seconds={1:F3} subtitle_chars={2} client_first_audio_ms={3:F1} server_ttfa_ms={4:F1} cancelled_seconds={5:F3} visemes={6} words={7}",
                    checks, end.AudioSeconds, subtitle.Length, firstAudioMs, end.Timings["time_to_first_audio_ms"], cancelEnd.AudioSeconds,
                    visemes.Count, words.Count));
            }
        }
    }
}
#endif
